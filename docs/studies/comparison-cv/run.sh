#!/usr/bin/env bash
# The cross-validated comparison: U-Net, FCN-8s and SegNet at the CPU preset, 5 folds over the 110
# patients, each patient tested once (docs/studies/comparison-cv ran it at the preset's one recipe of
# its day, docs/studies/comparison-own-recipes at each model's own).
# Finished runs are kept, a stopped one is resumed: run it again to go on after a stop.
#   bash docs/studies/comparison-cv/run.sh [DATA_DIR] [OUT_DIR] [MODELS]     (from the repository root)
# On a 2-core CPU, one runner per core, the work split in two near-equal halves (U-Net costs about
# as much as FCN-8s and SegNet together), then the table of the three:
#   taskset -c 0 bash docs/studies/comparison-cv/run.sh data/kaggle_3m runs/comparison-cv unet &
#   taskset -c 1 bash docs/studies/comparison-cv/run.sh data/kaggle_3m runs/comparison-cv fcn,segnet &
#   wait; python -m tools.compare --table --folds 5 --output-dir runs/comparison-cv
set -euo pipefail
data=${1:-data/kaggle_3m}
out=${2:-runs/comparison-cv}
python -m tools.compare --folds 5 --models "${3:-unet,fcn,segnet}" --output-dir "$out" \
    -- --data-dir "$data" --preset cpu
