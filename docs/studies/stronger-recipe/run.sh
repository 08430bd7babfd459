#!/usr/bin/env bash
# The recipe study of docs/studies/stronger-recipe: U-Net at the CPU preset's size on the comparison's patient
# split, the plain preset against each change alone and all together, judged on the validation
# patients only (--no-test). Finished steps are kept: run it again to go on after a stop.
#   bash docs/studies/stronger-recipe/run.sh [DATA_DIR] [OUT_DIR]        (from the repository root)
#   bash docs/studies/stronger-recipe/run.sh DATA_DIR OUT_DIR test       once the recipe is chosen: the test patients
set -euo pipefail
data=${1:-data/kaggle_3m}
out=${2:-runs/recipe}
# 5 epochs, not the preset's 20: six trainings must fit 90 minutes of a 2-core CPU
common=(--data-dir "$data" --preset cpu --epochs 5 --tumour-share 0 --val-frac 0.1 --test-frac 0.2 --no-test)

train() {  # train NAME FLAGS...
    local dir=$out/$1
    shift
    [ -f "$dir/summary.json" ] || python unet/train.py "${common[@]}" "$@" --output-dir "$dir"
}

evaluate() {  # evaluate NAME CHECKPOINT FLAGS...: --eval-only, validation patients only
    local dir=$out/eval/$1 ckpt=$out/$2
    shift 2
    [ -f "$dir/eval.json" ] || python unet/train.py --eval-only --checkpoint "$ckpt" --no-test \
        --data-dir "$data" "$@" --output-dir "$dir"
}

if [ "${3:-}" = test ]; then  # the chosen recipe and the plain preset, once, on the test patients
    for v in plain:plain/seed0 cosine:cosine; do
        dir=$out/test/${v%%:*}
        [ -f "$dir/eval.json" ] || python unet/train.py --eval-only --checkpoint "$out/${v#*:}" \
            --data-dir "$data" --output-dir "$dir"
    done
    python -m tools.recipe "$out" --set test --variants plain,cosine
    exit
fi
train plain/seed0
train cosine --schedule cosine
train context1 --context 1
train together --context 1 --schedule cosine
evaluate tta plain/seed0 --tta
evaluate together-tta together --tta
# the ensemble's members differ in their weights' seed only: the same training patients, so that
# the validation patients stay unseen (a fold ensemble has trained on all of them together)
train plain/seed1 --train-seed 1
train plain/seed2 --train-seed 2
evaluate ensemble plain
evaluate ensemble-tta plain --tta
python -m tools.recipe "$out"
