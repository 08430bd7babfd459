#!/usr/bin/env bash
# The README's two real-data `--preset cpu` commands, timed as a new user runs them: one after the
# other, on an idle machine (nothing else running), both cores to each run (the default).
#   bash docs/studies/readme-commands/run.sh [DATA_DIR] [OUT_DIR]      (from the repository root)
# Each run's log, metrics and summary land in OUT_DIR/<model>; the wall clock is printed last.
set -euo pipefail
data=${1:-data/kaggle_3m}
out=${2:-runs/readme-idle}
for model in unet fcn; do
    start=$SECONDS
    python "$model/train.py" --data-dir "$data" --preset cpu --output-dir "$out/$model"
    echo "$model: $((SECONDS - start)) s wall clock"
done
