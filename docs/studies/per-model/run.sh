#!/usr/bin/env bash
# Each model's own recipe (issue: a fair contest), chosen on validation patients only: fold 0's 88
# training patients of the cross-validated comparison (docs/studies/comparison-cv, same deal of the 110)
# split 66 train / 22 validation; fold 0's own 22 patients are never scored (--no-test). Every run
# validates every epoch, so metrics.jsonl gives validation Dice against training seconds.
# Finished runs are kept, a stopped one resumes: run it again to go on after a stop.
#   bash docs/studies/per-model/run.sh DATA_DIR OUT_DIR VARIANT...      (from the repository root)
# One runner per core (each run takes the cores it is given), e.g. on a 2-core machine:
#   taskset -c 0 bash docs/studies/per-model/run.sh data/kaggle_3m runs/per-model unet-lr1e-3 ... &
# Variants: <model>-lr<rate> (the CPU preset at that learning rate) and segnet-fold2[-lr<rate>] (the
# comparison's SegNet fold 2, its collapse, trained again as the comparison ran it), each with any
# of the suffixes -seed<N> (--train-seed N; the comparison ran segnet-fold2 with 0), -dice (the
# soft-Dice loss alone), -crop (--crop brain), -vol (--normalize volume), -flair<P> (--fill-flair P),
# -e<N> (N epochs), -s<N> (N-pixel images), -w<W> (--width W), -b<S> (--budget S: the epochs that
# fit in S seconds, at most the preset's) and -warm<share> (--warmup: the share of the steps the
# learning rate rises over), e.g. unet-lr1e-3-crop-e24, unet-lr1e-3-s192-b5400,
# unet-lr1e-3-w0.35-b5400, unet-lr1e-3-flair0.2, segnet-lr3e-4-seed1, segnet-fold2-seed0-warm0.2.
set -euo pipefail
data=$1 out=$2
shift 2
inner=(--data-dir "$data" --preset cpu --folds 5 --test-fold 0 --val-frac 0.2 --no-test)

train() {  # train MODEL NAME FLAGS...: a finished run is kept; the same command resumes a stopped one
    local model=$1 dir=$out/$2
    shift 2
    [ -f "$dir/summary.json" ] || python "$model/train.py" "$@" --output-dir "$dir"
}

for v in "$@"; do
    base=$v
    for suffix in -seed -dice -crop -vol -flair -e[0-9] -s[0-9] -w[0-9] -b[0-9] -warm; do base=${base%%$suffix*}; done
    extra=()
    IFS=- read -ra parts <<<"${v#"$base"}"
    for p in "${parts[@]}"; do
        case $p in
        '') ;;
        seed[0-9]*) extra+=(--train-seed "${p#seed}") ;;
        dice) extra+=(--loss dice) ;;
        crop) extra+=(--crop brain) ;;
        vol) extra+=(--normalize volume) ;;
        flair[0-9]*) extra+=(--fill-flair "${p#flair}") ;;
        e[0-9]*) extra+=(--epochs "${p#e}") ;;
        s[0-9]*) extra+=(--image-size "${p#s}") ;;
        w[0-9]*) extra+=(--width "${p#w}") ;;
        b[0-9]*) extra+=(--budget "${p#b}") ;;
        warm[0-9]*) extra+=(--warmup "${p#warm}") ;;
        *) echo "unknown suffix -$p in $v" >&2; exit 2 ;;
        esac
    done
    case $base in
    unet-lr* | fcn-lr* | segnet-lr*) train "${base%%-lr*}" "$v" "${inner[@]}" --lr "${base#*-lr}" "${extra[@]}" ;;
    segnet-fold2*)
        [[ $base == segnet-fold2-lr* ]] && extra+=(--lr "${base#segnet-fold2-lr}")
        train segnet "$v" --data-dir "$data" --preset cpu --folds 5 --test-fold 2 --val-frac 0 "${extra[@]}"
        ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
done
