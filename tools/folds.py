"""Cross-validation: train a model on each fold in turn, then report the mean and standard deviation
of its validation and test metrics. A fold already finished is kept; one interrupted is resumed.

    python -m tools.folds unet --folds 5 --output-dir runs/unet-cv -- --data-dir data/kaggle_3m
    python -m tools.folds fcn --folds 5 \\
        --launch "accelerate launch --config_file accelerate_configs/4gpu.yaml" -- ...

Or the folds in parallel, a Slurm job array of one task (one GPU) per fold, then their table:

    sbatch --array=0-4 --gres=gpu:1 run.sh unet --folds 5 --output-dir runs/unet-cv5 --data-dir ...
    python -m tools.folds unet --folds 5 --output-dir runs/unet-cv5 --summary
"""

import argparse
import shlex
import statistics
import sys
from datetime import datetime
from pathlib import Path

from common import files, registry, report
from common.cli import Parser, parse_with_train_flags
from common.errors import UserError, child, contract
from common.folders import claim, finished, not_finished, recipe_flags, same_recipe
from common.jobs import run_folder
from common.metrics import METRICS
from common.ranges import count, pathname

ROOT = Path(__file__).resolve().parents[1]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries):
    """{set: {metric: [mean, std]}} over the folds' summary.json."""
    out = {}
    for side, key in (("val", "best_val"), ("test", "test")):
        rows = [s[key] for s in summaries if s.get(key)]
        if rows:
            out[side] = {m.key: list(mean_std([r.get(m.key) for r in rows])) for m in METRICS}
    return out


def markdown(model, folds, result, missing=()):
    over = f"{folds - len(missing)} of {folds} folds" if missing else "folds"
    lines = [
        f"# {model}: {folds}-fold cross-validation (mean +- std over {over})",
        "",
        "| set | " + " | ".join(m.title for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for side, values in result.items():
        cells = [
            "-" if values[m.key][0] is None else f"{values[m.key][0]:.4f} +- {values[m.key][1]:.4f}"
            for m in METRICS
        ]
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    if missing:
        lines += [
            "",
            "Not finished, left out: " + ", ".join(f"fold {f} ({why})" for f, why in missing.items()),
        ]
    return "\n".join(lines) + "\n"


def collect(out, folds, model):
    """The finished folds' summaries, and {fold: why} for the others."""
    summaries, missing, recipes = [], {}, {}
    for fold in range(folds):
        run_dir = run_folder(out, fold=fold)
        if finished(run_dir):
            own = files.read_json(run_dir / "args.json")
            if (own.get("model"), own.get("folds"), own.get("fold")) != (model, folds, fold):
                raise UserError(
                    f"--output-dir {run_dir}: a {own.get('model')} run of --folds {own.get('folds')} --fold "
                    f"{own.get('fold')}, not {model} fold {fold} of {folds}"
                )
            summaries.append(files.read_json(run_dir / "summary.json"))
            recipes[f"fold {fold}"] = own
        else:
            missing[fold] = f"{not_finished(run_dir)}; the same task or command again resumes it"
    same_recipe(recipes, f"--output-dir {out}", ignore=("fold",))  # one seed, split and recipe
    return summaries, missing


def train_folds(args, flags, out):
    """Each fold without a summary.json in turn; the first that fails stops the rest (its exit code)."""
    launch = shlex.split(args.launch) if args.launch else [sys.executable]
    for fold in range(args.folds):
        run_dir = run_folder(out, fold=fold)
        if finished(run_dir):
            continue
        again = ["--resume", str(run_dir)] if (run_dir / "args.json").exists() else []
        cmd = [
            *launch,
            str(ROOT / args.model / "train.py"),
            *flags,
            "--folds",
            str(args.folds),
            "--fold",
            str(fold),
            "--output-dir",
            str(run_dir),
            *again,
        ]
        report.console.print(f"[bold]fold {fold + 1}/{args.folds}[/]: {shlex.join(cmd)}")
        code = child(cmd, f"fold {fold}")
        if code != 0:
            print(
                f"error: fold {fold} failed (exit code {code}); run the same command again to resume it",
                file=sys.stderr,
            )
            return 1
    return 0


def summarise(args, out):
    """cv.json and cv.md over the finished folds; 1 when a fold is missing (named), else 0."""
    summaries, missing = collect(out, args.folds, args.model)
    claim(out, "folds", {"model": args.model, "folds": args.folds})
    named = ", ".join(f"fold {f} ({why})" for f, why in missing.items())
    if not summaries:
        print(f"error: no fold has finished in {out}: {named}", file=sys.stderr)
        return 1
    result = aggregate(summaries)
    done = [f for f in range(args.folds) if f not in missing]
    cv = {"model": args.model, "folds": args.folds, "finished": done, "missing": missing, **result}
    files.write_json(out / "cv.json", cv)
    files.write_text(out / "cv.md", markdown(args.model, args.folds, result, missing))
    report.console.print(markdown(args.model, args.folds, result, missing))
    report.console.print(f"wrote {out / 'cv.json'} and {out / 'cv.md'}")
    if missing:
        print(f"error: {len(missing)} of {args.folds} folds not finished in {out}: {named}", file=sys.stderr)
        return 1
    return 0


EXIT_CODES = """exit code: 0 when every fold has finished; 1 when one has not (the table covers the
others and the last line names them), or a fold's training failed; 2 on a user error."""


def parser():
    p = Parser(
        prog="python -m tools.folds",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=registry.names())
    p.add_argument("--folds", type=count(2), default=5)
    p.add_argument("--output-dir", type=pathname, default=None, help="default runs/<model>-cv<K>-<time>")
    p.add_argument("--launch", default=None, help="launcher command for each fold (default: this python)")
    p.add_argument(
        "--summary",
        action="store_true",
        help="train nothing: the table of the folds finished in --output-dir (by a job array, say)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    return contract(lambda argv: cross_validate(*parse_with_train_flags(parser(), argv)), argv)


def cross_validate(args, flags):
    if args.summary and (args.output_dir is None or not args.output_dir.is_dir()):
        raise UserError(f"argument --summary: --output-dir must be the folds' folder (got {args.output_dir})")
    out = args.output_dir or Path("runs") / f"{args.model}-cv{args.folds}-{datetime.now():%Y%m%d-%H%M%S}"
    if not args.summary:  # before anything trains; a summary claims the folder once it has read it
        claim(out, "folds", {"model": args.model, "folds": args.folds, "flags": recipe_flags(flags)})
    code = 0 if args.summary else train_folds(args, flags, out)
    return code or summarise(args, out)


if __name__ == "__main__":
    sys.exit(main())
