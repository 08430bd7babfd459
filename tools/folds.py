"""Cross-validation: train a model on each fold in turn, then report the mean and standard deviation
of its validation and test metrics. A fold already finished is kept; one interrupted is resumed.

    python -m tools.folds unet --folds 5 --output-dir runs/unet-cv -- --data-dir data/kaggle_3m
    python -m tools.folds fcn --folds 5 \\
        --launch "accelerate launch --config_file accelerate_configs/4gpu.yaml" -- ...
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from common import registry, report
from common.cli import parse_with_train_flags
from common.metrics import METRICS

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


def markdown(model, folds, result):
    lines = [
        f"# {model}: {folds}-fold cross-validation (mean +- std over folds)",
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
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tools.folds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=registry.names())
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--output-dir", type=Path, default=None, help="default runs/<model>-cv<K>-<time>")
    p.add_argument("--launch", default=None, help="launcher command for each fold (default: this python)")
    args, flags = parse_with_train_flags(p, argv)
    if args.folds < 2:
        p.error(f"argument --folds: must be at least 2, got {args.folds}")
    out = args.output_dir or Path("runs") / f"{args.model}-cv{args.folds}-{datetime.now():%Y%m%d-%H%M%S}"
    launch = shlex.split(args.launch) if args.launch else [sys.executable]
    summaries = []
    for fold in range(args.folds):
        run_dir = out / f"fold-{fold}"
        if not (run_dir / "summary.json").exists():
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
            code = subprocess.call(cmd)
            if code != 0:
                print(
                    f"error: fold {fold} failed (exit code {code}); run the same command again to resume it",
                    file=sys.stderr,
                )
                return 2 if code == 2 else 1
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    result = aggregate(summaries)
    report.write_json(out / "cv.json", {"model": args.model, "folds": args.folds, **result})
    (out / "cv.md").write_text(markdown(args.model, args.folds, result))
    report.console.print(markdown(args.model, args.folds, result))
    report.console.print(f"wrote {out / 'cv.json'} and {out / 'cv.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
