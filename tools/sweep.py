"""A grid of short training runs through the real launcher: processes x workers x pipeline x
precision x threads, a CSV row per run (epoch 2 of `--steps` steps per process, no evaluation).

    python -m tools.sweep unet --processes 1 2 --workers 0 1 2 --pipelines decode cached \\
        --output-dir sweeps/unet -- --synthetic --width 0.25 --image-size 128
    sbatch run.sh sweep unet --processes 1 2 4 --workers 0 1 8 -- --data-dir data/kaggle_3m   # on a GPU node

`s_per_3929` is the time one epoch over the full dataset (3929 slices) takes at the measured
images/s: the quantity the original study plotted. Plot with `python -m tools.results --sweep`.
"""

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from common import files, pipelines, registry, report
from common.cli import Parser, parse_with_train_flags
from common.errors import UserError, contract
from common.folders import claim
from common.ranges import count, pathname

ROOT = Path(__file__).resolve().parents[1]
FULL_DATASET = 3929


def launcher(processes):
    """accelerate launch with a stored config: the GPUs where there are any, else gloo on the CPU."""
    gpu = torch.cuda.is_available()
    config = ("1gpu" if processes == 1 else "4gpu") if gpu else ("cpu" if processes == 1 else "cpu2")
    return [
        "accelerate",
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / f"{config}.yaml"),
        "--num_processes",
        str(processes),
    ]


def parser():
    p = Parser(
        prog="python -m tools.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=registry.names())
    p.add_argument("--processes", nargs="+", type=count(1), default=[1, 2])
    p.add_argument("--workers", nargs="+", type=count(0), default=[0, 1, 2])
    p.add_argument("--pipelines", nargs="+", default=["decode", "cached"], choices=list(pipelines.PIPELINES))
    p.add_argument("--precisions", nargs="+", default=["no"], choices=("no", "bf16", "fp16"))
    threads = "threads per process; 0: automatic (cores / processes); more shows oversubscription"
    p.add_argument("--threads", nargs="+", type=count(1, zero="automatic"), default=[0], help=threads)
    p.add_argument("--steps", type=count(1), default=20, help="steps per process and epoch")
    p.add_argument("--output-dir", type=pathname, default=Path("sweeps"))
    return p


def main(argv=None):
    return contract(lambda argv: sweep(*parse_with_train_flags(parser(), argv)), argv)


def sweep(args, flags):
    settings = itertools.product(args.processes, args.pipelines, args.workers, args.precisions, args.threads)
    grid = [g for g in settings if g[1] in pipelines.WORKERS or g[2] == 0]
    if not grid:  # before anything is written: the CSV of an earlier sweep stays
        raise UserError(
            f"argument --workers: --pipelines {' '.join(args.pipelines)} take --workers 0 only: "
            "the grid is empty"
        )
    claim(args.output_dir, "sweep")
    rows = []
    for k, (procs, pipeline, workers, precision, threads) in enumerate(grid, 1):
        name = f"{args.model}-p{procs}-{pipeline}-w{workers}-{precision}-t{threads}"
        out = args.output_dir / "runs" / name
        setting = ["--data-pipeline", pipeline, "--num-workers", str(workers), "--mixed-precision", precision]
        timing = ["--epochs", "2", "--max-steps", str(args.steps), "--no-eval", "--step-timing"]
        cmd = [*launcher(procs), str(ROOT / args.model / "train.py"), *flags, *timing, *setting,
               "--threads", str(threads), "--output-dir", str(out)]  # fmt: skip
        report.console.print(f"[{k}/{len(grid)}] {name}")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            if result.returncode == 2 and said:  # the run's own user error, as it said it
                raise UserError(f"run {name}: {said[-1][len('error: ') :]}")
            print(f"error: run {name} failed ({shlex.join(cmd)}):\n{result.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(sweep_row(args.model, out, procs, pipeline, workers, precision, threads))
        report.console.print(
            f"    {rows[-1]['images_per_s']:.1f} images/s, data wait {rows[-1]['data_wait_share']:.1%}"
        )
    path = args.output_dir / f"sweep-{args.model}.csv"
    files.write_csv(path, rows, list(rows[0]))
    report.console.print(f"wrote {path} ({len(rows)} runs)")
    return 0


def sweep_row(model, out, procs, pipeline, workers, precision, threads):
    """A run's line of the sweep's CSV, from its summary.json and its last epoch."""
    s = files.read_json(out / "summary.json")
    r = files.read_jsonl(out / "metrics.jsonl")[-1]
    return {
        "model": model,
        "device": s["device"],
        "processes": procs,
        "pipeline": pipeline,
        "workers": workers,
        "precision": precision,
        "threads_setting": threads or "auto",
        "threads": s["threads"],
        "global_batch": s["global_batch_size"],
        "images_per_s": r["images_per_s"],
        "s_per_3929": FULL_DATASET / r["images_per_s"],
        "data_wait_share": r["data_wait_share"],
        "step_ms": 1e3 * r["step_median_s"],
        "step_data_ms": 1e3 * r["step_data_median_s"],
        "step_compute_ms": 1e3 * r["step_compute_median_s"],
        "peak_memory_mb": r["peak_memory_mb"],
    }


if __name__ == "__main__":
    sys.exit(main())
