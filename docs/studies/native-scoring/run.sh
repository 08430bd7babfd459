#!/usr/bin/env bash
# The second recipe study (docs/studies/native-scoring): U-Net at the CPU preset's size (66 / 22 / 22 patients of
# the 110), the current recipe against each option of issue 21 alone and all together, every run
# scored at native resolution and judged on the 22 validation patients only (--no-test). Finished
# runs are kept, a stopped one is resumed: run it again to go on after a stop.
#   bash docs/studies/native-scoring/run.sh [DATA_DIR] [OUT_DIR]        (from the repository root)
#   bash docs/studies/native-scoring/run.sh DATA_DIR OUT_DIR others ["fcn-plain ..."]   the chosen recipe on FCN-8s
#                                        and SegNet, beside today's
#   bash docs/studies/native-scoring/run.sh DATA_DIR OUT_DIR test ["plain ..."]   once chosen: the test patients, once
#   bash docs/studies/native-scoring/run.sh DATA_DIR OUT_DIR unet "all crop"   only these U-Net variants (one
#                                        runner per core: each run takes the cores it is given)
set -euo pipefail
data=${1:-data/kaggle_3m}
out=${2:-runs/recipe-2}
# a fixed number of epochs, not --budget: the variants cost the same per epoch, and a budget would
# make their accuracy depend on what else this machine was doing; 12 epochs are ~30 minutes here
# the preset as it was when the study began: every slice once per epoch (the preset now samples
# tumour, the recipe this study chose)
common=(--data-dir "$data" --preset cpu --epochs 12 --tumour-share 0 --no-test)
# chosen on the validation patients (docs/studies/native-scoring): the foreground sampling alone was above
# today's recipe and above the three options together
chosen=(--tumour-share 0.5)

train() {  # train MODEL NAME FLAGS...
    local model=$1 dir=$out/$2
    shift 2
    if [ -f "$dir/summary.json" ]; then return; fi
    if [ -d "$dir/last" ]; then
        python "$model/train.py" --resume "$dir"
    else
        python "$model/train.py" "${common[@]}" "$@" --output-dir "$dir"
    fi
}

case "${3:-}" in
test)
    for v in ${4:-plain tumour-share fcn-plain fcn-tumour-share segnet-plain segnet-tumour-share}; do
        dir=$out/test/$v model=unet
        case $v in fcn-*) model=fcn ;; segnet-*) model=segnet ;; esac
        [ -f "$dir/eval.json" ] || python "$model/train.py" --eval-only --checkpoint "$out/$v" \
            --data-dir "$data" --output-dir "$dir"
    done
    ;;
others)
    for v in ${4:-fcn-plain fcn-tumour-share segnet-plain segnet-tumour-share}; do
        case $v in
        *-plain) train "${v%-plain}" "$v" ;;
        *-tumour-share) train "${v%-tumour-share}" "$v" "${chosen[@]}" ;;
        *) echo "unknown variant $v" >&2; exit 2 ;;
        esac
    done
    ;;
*)
    for v in ${4:-plain all tumour-share volume crop}; do
        case $v in
        plain) train unet plain ;;
        all) train unet all --tumour-share 0.5 --normalize volume --crop brain ;;  # as its args.json
        tumour-share) train unet tumour-share --tumour-share 0.5 ;;
        volume) train unet volume --normalize volume ;;
        crop) train unet crop --crop brain ;;
        # the gap to the dataset authors': what twice the epochs (an hour on both cores) adds
        tumour-share-24) train unet tumour-share-24 --tumour-share 0.5 --epochs 24 ;;
        *) echo "unknown variant $v" >&2; exit 2 ;;
        esac
    done
    ;;
esac
