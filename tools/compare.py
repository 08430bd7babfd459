"""The comparison the project exists for: U-Net, FCN-8s and SegNet trained by one command (each
model at its own table of the preset, if it has one: comparison.md says where they differ) on one
patient split, the best epoch of each chosen on the validation patients, each tested once on the
test patients; intervals over patients and paired tests between the models.

    python -m tools.compare --output-dir runs/comparison -- --data-dir data/kaggle_3m
    python -m tools.compare --original --output-dir runs/comparison \\
        --launch "accelerate launch --config_file accelerate_configs/4gpu.yaml" \\
        -- --data-dir data/kaggle_3m --mixed-precision bf16
    sbatch --array=0-2 run.sh unet,fcn,segnet --output-dir runs/comparison --val-frac 0.1 --test-frac 0.2 ...
    python -m tools.compare --table --output-dir runs/comparison     # after the array: the table only
    python -m tools.compare --folds 5 --output-dir runs/comparison-cv -- --data-dir data/kaggle_3m
    sbatch --array=0-14 run.sh unet,fcn,segnet --folds 5 --output-dir runs/comparison-cv ...
    python -m tools.compare --table --folds 5 --output-dir runs/comparison-cv

Flags after `--` go to every train.py; the split defaults to 70 / 10 / 20 % of the patients
(`--val-frac 0.1 --test-frac 0.2`). A finished run is kept, an interrupted one resumed. --original
adds U-Net on the original's leaky slice split (`unet-slice/`), reported apart, for contrast.
Writes into --output-dir: a run folder per model, per-patient.csv, summary.csv, split.json,
comparison.md and the figures paired-dice.png, dice-vs-volume.png and predictions.png. --versus
OTHER pairs each model with the same model of another comparison folder on the same test patients
(versus.json, and a section of comparison.md): what a change of recipe did to each model; with
--folds, each patient in the same fold there (the same deal).

--folds K cross-validates instead: every patient is dealt into K folds (by tumour slices, seeded),
and fold i is tested by models trained on the others (MODEL/fold-i), each keeping its last epoch
(no validation patients; `-- --val-frac F` draws them from the training folds instead). Its table
is common/comparison_cv.py's: every patient once, intervals over all of them, pairs also by tumour size.
"""

import argparse
import shlex
import sys
from pathlib import Path

from common import comparison, comparison_cv, registry, report
from common.cli import Parser, parse_with_train_flags
from common.errors import UserError, child, contract
from common.folders import claim, finished, recipe_flags
from common.jobs import run_folder
from common.ranges import count, pathname

ROOT = Path(__file__).resolve().parents[1]


SPLIT = ["--val-frac", "0.1", "--test-frac", "0.2"]  # before the user's flags: theirs win


def cv_split(folds, fold):
    """A fold's split in the cross-validated comparison: every patient dealt into the folds, this one
    tested, no validation patients (the last epoch is the model: docs/studies/comparison-cv says why)."""
    return ["--folds", str(folds), "--test-fold", str(fold), "--val-frac", "0"]


def runs_of(out, names, original=False, folds=0):
    """(what, model, run folder, flags before the user's, flags after) of each run of a comparison."""
    if folds:
        return [
            (f"{n} fold {i}", n, run_folder(out, n, i), cv_split(folds, i), [])
            for n in names
            for i in range(folds)
        ]
    runs = [(n, n, run_folder(out, n), SPLIT, []) for n in names]
    return runs + (
        [(comparison.ORIGINAL, "unet", run_folder(out, comparison.ORIGINAL), SPLIT, ["--split", "slice"])]
        if original
        else []
    )


def train_all(runs, launch, flags):
    """Train each run that has not finished (resuming one that has a checkpoint); a run's own user
    error stops the comparison with that error."""
    for what, model, run_dir, before, after in runs:
        if finished(run_dir):
            report.console.print(f"{what}: finished, kept ({run_dir})")
            continue
        again = ["--resume", str(run_dir)] if (run_dir / "last").is_dir() else []
        cmd = [*launch, str(ROOT / model / "train.py"), *before, *flags, *after, "--output-dir", str(run_dir)]
        report.console.print(f"[bold]{what}[/]: {shlex.join(cmd + again)}")
        code = child(cmd + again, what)
        if code != 0:
            raise UserError(f"{what} failed (exit code {code}); run the same command again to resume it")


def parser():
    p = Parser(
        prog="python -m tools.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--output-dir", type=pathname, required=True, help="the comparison folder (a run folder per model)"
    )
    p.add_argument(
        "--models",
        default=",".join(registry.names()),
        help="comma-separated, from " + ", ".join(registry.names()),
    )
    p.add_argument("--original", action="store_true", help="also U-Net on the original's leaky slice split")
    p.add_argument("--launch", default=None, help="launcher for each run (default: this python)")
    p.add_argument(
        "--table", action="store_true", help="only tabulate the finished runs (after a Slurm array)"
    )
    p.add_argument(
        "--versus",
        type=pathname,
        help="another comparison folder (e.g. another recipe): each model paired with itself there",
    )
    p.add_argument(
        "--folds",
        type=count(2, zero="one split"),
        default=0,
        help="cross-validate: every patient dealt into K folds, each tested once by models trained on "
        "the others (run folders MODEL/fold-i)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    return contract(lambda argv: compare(*parse_with_train_flags(parser(), argv)), argv)


def compare(args, flags):
    names = args.models.split(",")
    if bad := [n for n in names if n not in registry.names()]:
        raise UserError(
            f"argument --models: unknown model {bad[0]!r} (choose from {', '.join(registry.names())})"
        )
    if args.folds and args.original:
        raise UserError("argument --folds: not with --original (it pairs runs of one split)")
    if "--no-test" in flags:  # a comparison is made of the test patients' scores
        raise UserError("--no-test: a comparison tables the models on their test patients; leave it out")
    if args.versus and not (args.versus / "per-patient.csv").is_file():  # before hours of training
        raise UserError(f"--versus {args.versus}: no per-patient.csv there (a tools.compare folder)")
    # a run folder, a sweep, or a comparison made with other training flags is not this one's
    identity = {"folds": args.folds, **({} if args.table else {"flags": recipe_flags(flags)})}
    claim(args.output_dir, "comparison", identity, record=not args.table)  # a table only reads it
    if not args.table:
        train_all(
            runs_of(args.output_dir, names, args.original, args.folds),
            shlex.split(args.launch) if args.launch else [sys.executable],
            flags,
        )
    if not args.output_dir.is_dir():
        raise UserError(f"--output-dir {args.output_dir}: not a folder")
    if args.folds:
        comparison_cv.table(args.output_dir, names, args.folds, args.versus)
    else:
        comparison.table(
            args.output_dir, args.versus, names + ([comparison.ORIGINAL] if args.original else [])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
