"""Benchmarks: figures measured side by side in one run, printed with their ratios.

    python -m tools.bench data --synthetic      # images/s each data pipeline delivers, 0-2 workers
    python -m tools.bench step --synthetic --width 0.25 --image-size 128
        # bare forward+backward on tensors in memory, against the full loop with each pipeline
    python -m tools.bench scoring --width 0.25 --image-size 128   # what native-resolution scoring costs
    python -m tools.bench suite --output-dir docs/studies/gpu     # the single-GPU suite, <= 6 minutes
    python -m tools.bench gpu --data-dir D --budget 480 --output-dir docs/studies/gpu
        # the suite, then a U-Net training run in the time left, its results and plots

Every clock reading follows a device synchronisation; per-step figures are medians after a
warm-up. Loop figures come from real `train.py` runs (epoch 2 of `--max-steps` steps, no evaluation).
Data: --data-dir (default $LGG_DATA_DIR) or --synthetic.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import data, files, pipelines, registry, report, synthetic
from common.cache import open_dataset
from common.cli import Parser, default_cache_dir
from common.errors import child, contract
from common.folders import make
from common.loss import loss_from_terms, loss_terms
from common.ranges import amount, count, image_size, pathname, positive
from common.timing import default_threads, device_name, gflops, synchronize

ROOT = Path(__file__).resolve().parents[1]


def build_args(model, width, image_size):
    return registry.model_args({"model": model, "width": width, "image_size": image_size})


def load_source(args):
    """(data dir, slices, Cache): --data-dir, or the phantoms (args.phantoms patients)."""
    data_dir = (
        synthetic.ensure_phantoms(args.cache_dir, patients=args.phantoms) if args.synthetic else args.data_dir
    )
    slices, cache = open_dataset(data_dir, args.cache_dir, args.image_size, progress=True)
    return data_dir, slices, cache


def bench_data(args, device):
    """Images/s each pipeline delivers to the device (uint8 batches), after a warm-up."""
    _, slices, cache = load_source(args)
    parts = {"train": list(range(len(slices))), "val": [], "test": []}
    batches = min(args.batches, len(slices) // args.batch_size - args.warmup)
    rows = []
    settings = [
        (p, w) for p in pipelines.PIPELINES for w in (args.workers if p in pipelines.WORKERS else [0])
    ]
    for pipeline, workers in settings:
        loader = data.loaders(
            parts,
            pipeline,
            slices,
            cache.images,
            cache.masks,
            args.image_size,
            args.batch_size,
            workers,
            device.type == "cuda",
            device,
        )["train"]
        it = iter(loader)
        for _ in range(args.warmup):
            next(it)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            x, y, _ = next(it)
            x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        synchronize(device)
        rows.append(
            {
                "pipeline": pipeline,
                "workers": workers,
                "images_per_s": batches * args.batch_size / (time.perf_counter() - start),
            }
        )
    x, y, _ = next(
        iter(
            data.loaders(
                parts,
                "device",
                slices,
                cache.images,
                cache.masks,
                args.image_size,
                args.batch_size,
                0,
                False,
                device,
            )["train"]
        )
    )
    inputs = step_median(lambda: data.to_inputs(x, y, 0.5, 15, 0.05), device, args.warmup, batches)
    for r in rows:
        r["vs_decode_0"] = r["images_per_s"] / rows[0]["images_per_s"]
    return rows, {"inputs_images_per_s": args.batch_size / inputs}


@torch.no_grad()
def bench_scoring(args, device):
    """What scoring at native resolution costs in an evaluation, per batch of the data: the network's
    forward pass (U-Net at --width, --image-size), counting at that size against the resized masks
    (before), and counting natively (resizing the logits back, unpacking the released masks)."""
    from common import metrics
    from common.evaluate import native_counts

    _, _, cache = load_source(args)
    model = (
        registry.build({"model": "unet", "width": args.width, "image_size": args.image_size})
        .to(device)
        .eval()
    )
    at = np.arange(min(args.batch_size, len(cache.images)))
    images, masks = (torch.from_numpy(np.array(a[at])).to(device) for a in (cache.images, cache.masks))
    x, y = data.to_inputs(images, masks)
    logits, size = model(x), cache.native_size
    steps = {
        "forward": lambda: model(x),
        "resized masks": lambda: metrics.confusion(logits, y),
        "native": lambda: native_counts(cache, logits, at),
    }
    ms = {k: 1000 * step_median(fn, device, args.warmup, args.batches) for k, fn in steps.items()}
    return [
        {"step": k, "ms_per_batch": v, "vs_forward": v / ms["forward"], "native_size": f"{size[0]}x{size[1]}"}
        for k, v in ms.items()
    ]


def step_median(fn, device, warmup, steps):
    times = []
    for k in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_images_per_s(model_name, args, device, batch, precision="no", channels_last=False):
    """Forward, backward and Adam step of one augmented batch already on the device: the ceiling
    of the loop (same model, inputs, loss and optimiser; nothing else)."""
    torch.manual_seed(0)
    model = registry.build({"model": model_name, "width": args.width, "image_size": args.image_size})
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = data.to_inputs(batch[0].to(device), batch[1].to(device), 0.5, 15, 0.05, channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_from_terms(loss_terms(model(x), y), "bce+dice")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return args.batch_size / step_median(step, device, args.warmup, args.batches)


def peak_tflops(device, precision):
    """Measured dense matmul TFLOP/s (8192^2, bf16, or TF32 for fp32 runs: cuDNN runs fp32
    convolutions on TF32 by default): the denominator of model FLOPs utilisation."""
    if device.type != "cuda":
        return None
    n, dtype = 8192, torch.bfloat16 if precision in ("bf16", "fp16") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        seconds = step_median(lambda: a @ b, device, 3, 20)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / seconds / 1e12


def loop_run(model, args, out, flags):
    """A real training run of 2 short epochs (epoch 1 warms up); its epoch-2 figures."""
    cmd = [
        sys.executable,
        str(ROOT / model / "train.py"),
        "--data-dir",
        str(args.data_dir),
        "--cache-dir",
        str(args.cache_dir),
        "--image-size",
        str(args.image_size),
        "--width",
        str(args.width),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "2",
        "--max-steps",
        str(args.batches + args.warmup),
        "--no-eval",
        "--step-timing",
        "--output-dir",
        str(out),
        *flags,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rows = files.read_jsonl(out / "metrics.jsonl")
    summary = files.read_json(out / "summary.json")
    r = rows[-1]
    return {
        "images_per_s": summary["global_batch_size"] / r["step_median_s"],
        "epoch_images_per_s": r["images_per_s"],
        "data_wait_share": r["data_wait_share"],
        "step_data_median_ms": 1e3 * r["step_data_median_s"],
        "step_compute_median_ms": 1e3 * r["step_compute_median_s"],
        "peak_memory_mb": r["peak_memory_mb"],
    }


def first_batch(args):
    """One training batch of the benchmark's data (uint8 images, masks)."""
    _, _, cache = load_source(args)
    return torch.from_numpy(cache.images[: args.batch_size].copy()), torch.from_numpy(
        cache.masks[: args.batch_size].copy()
    )


def bench_step(args, device):
    """Per model: bare images/s (measured before and after the loops, averaged, so that drift in a
    shared machine's speed does not pass for loop overhead), the loop's with each pipeline, and
    their ratio."""
    rows, batch, peak = [], first_batch(args), peak_tflops(device, "no")
    for model in args.models:
        before = bare_images_per_s(model, args, device, batch)
        g = gflops(registry.script(model).build_model, build_args(model, args.width, args.image_size))
        mine = []
        for pipeline in args.pipelines:
            loop = loop_run(
                model, args, args.output_dir / f"{model}-{pipeline}", ["--data-pipeline", pipeline]
            )
            mine.append(
                {
                    "model": model,
                    "width": args.width,
                    "image_size": args.image_size,
                    "gflops_per_image": g,
                    "pipeline": pipeline,
                    **loop,
                }
            )
        bare = (before + bare_images_per_s(model, args, device, batch)) / 2
        for r in mine:  # model FLOPs utilisation: forward + backward ~ 3x forward, against the matmul peak
            r.update(
                bare_images_per_s=bare,
                efficiency=r["images_per_s"] / bare,
                mfu=3 * g * r["images_per_s"] / 1e3 / peak if peak else None,
            )
        rows += mine
    return rows


SUITE = [  # (name, train.py flags): the original's design against each technique added
    ("fp32 decode", ["--mixed-precision", "no", "--data-pipeline", "decode", "--num-workers", "8"]),
    ("fp32 device", ["--mixed-precision", "no", "--data-pipeline", "device"]),
    ("bf16+cl device", ["--mixed-precision", "bf16", "--channels-last", "--data-pipeline", "device"]),
    (
        "bf16+cl+compile device",
        ["--mixed-precision", "bf16", "--channels-last", "--compile", "--data-pipeline", "device"],
    ),
]


def bench_suite(args, device):
    """U-Net, FCN, SegNet at args.width / args.image_size: each SUITE setting through train.py, and
    the bare step in fp32 and bf16 + channels_last with model FLOPs utilisation."""
    peaks = {p: peak_tflops(device, p) for p in ("no", "bf16")}
    rows, batch = [], first_batch(args)
    for model in args.models:
        g = gflops(registry.script(model).build_model, build_args(model, args.width, args.image_size))
        for precision, cl in (("no", False), ("bf16", True)):
            ips = bare_images_per_s(model, args, device, batch, precision, cl)
            rows.append(
                {
                    "model": model,
                    "setting": f"bare {'fp32' if precision == 'no' else 'bf16+cl'}",
                    "images_per_s": ips,
                    "gflops_per_image": g,
                    "mfu": 3 * g * ips / 1e3 / peaks[precision] if peaks[precision] else None,
                }
            )
            report.console.print(f"{model} {rows[-1]['setting']}: {ips:.1f} images/s")
        for name, flags in SUITE:
            if "--compile" in flags and model not in args.compile_models:
                continue
            try:
                loop = loop_run(
                    model, args, args.output_dir / "runs" / f"{model}-{name.replace(' ', '-')}", flags
                )
            except (
                RuntimeError
            ) as e:  # one setting failing (a compiler missing, say) must not lose the others
                report.console.print(f"{model} {name}: failed, left out of the table\n{e}")
                continue
            precision = "bf16" if "bf16" in name else "no"
            rows.append(
                {
                    "model": model,
                    "setting": name,
                    "gflops_per_image": g,
                    **loop,
                    "mfu": 3 * g * loop["images_per_s"] / 1e3 / peaks[precision]
                    if peaks[precision]
                    else None,
                }
            )
            report.console.print(
                f"{model} {name}: {loop['images_per_s']:.1f} images/s, "
                f"data wait {loop['data_wait_share']:.1%}"
            )
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["setting"] == "fp32 decode"), None)
        r["speedup_vs_fp32_decode"] = r["images_per_s"] / base["images_per_s"] if base else None
    return rows, {"peak_tflops_tf32": peaks["no"], "peak_tflops_bf16": peaks["bf16"]}


def markdown(rows, columns):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return "-" if v is None else str(v)

    return (
        "\n".join(
            ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
            + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
        )
        + "\n"
    )


COLUMNS = {
    "data": ["pipeline", "workers", "images_per_s", "vs_decode_0"],
    "step": ["model", "width", "image_size", "gflops_per_image", "bare_images_per_s", "pipeline",
             "images_per_s", "efficiency", "mfu", "data_wait_share", "step_data_median_ms",
             "step_compute_median_ms"],
    "scoring": ["step", "ms_per_batch", "vs_forward", "native_size"],
    "suite": ["model", "setting", "images_per_s", "speedup_vs_fp32_decode", "mfu", "data_wait_share",
              "step_data_median_ms", "step_compute_median_ms", "peak_memory_mb"],
}  # fmt: skip


def parser():
    p = Parser(
        prog="python -m tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("what", choices=("data", "step", "scoring", "suite", "gpu"))
    p.add_argument(
        "--data-dir", type=pathname, default=Path(os.environ.get("LGG_DATA_DIR", "data/kaggle_3m"))
    )
    p.add_argument("--synthetic", action="store_true", help="phantoms (written once into the cache)")
    p.add_argument(
        "--phantoms", type=count(1), default=10, help="with --synthetic: phantom patients (20 slices each)"
    )
    p.add_argument("--cache-dir", type=pathname, default=default_cache_dir())
    p.add_argument("--image-size", type=image_size(), default=256)
    p.add_argument("--width", type=positive(), default=1.0)
    p.add_argument("--batch-size", type=count(1), default=16)
    p.add_argument("--models", nargs="+", default=registry.names(), choices=registry.names())
    p.add_argument(
        "--pipelines", nargs="+", default=list(pipelines.PIPELINES), choices=list(pipelines.PIPELINES)
    )
    p.add_argument(
        "--workers", nargs="+", type=count(0), default=[0, 1, 2], help="bench data: DataLoader workers"
    )
    p.add_argument("--warmup", type=count(0), default=3, help="steps (batches) not timed")
    p.add_argument("--batches", type=count(1), default=20, help="steps (batches) timed")
    compiled = "suite: the models also timed with torch.compile (compiling takes a minute each)"
    p.add_argument("--compile-models", nargs="*", default=registry.names(), help=compiled)
    p.add_argument(
        "--budget",
        type=amount(unit="seconds"),
        default=480,
        help="gpu: seconds for the suite and the training run",
    )
    p.add_argument("--train-width", type=positive(), default=1.0, help="gpu: width of the U-Net training run")
    p.add_argument("--output-dir", type=pathname, default=Path("bench"))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    return contract(lambda argv: bench(parser().parse_args(argv)), argv)


def bench(args):
    started, what = time.perf_counter(), args.what
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(default_threads(1))
    torch.set_flush_denormal(True)  # as the training loop does
    make(args.output_dir)
    if args.synthetic:
        args.data_dir = synthetic.ensure_phantoms(args.cache_dir, patients=args.phantoms)
    head = (
        f"{device_name(device)}, 1 process, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.image_size} px, data {'phantoms' if args.synthetic else args.data_dir}"
    )
    report.console.print(head)
    if args.what == "data":
        rows, extra = bench_data(args, device)
    elif args.what == "step":
        rows, extra = bench_step(args, device), {}
    elif args.what == "scoring":
        rows, extra = bench_scoring(args, device), {}
    else:
        rows, extra = bench_suite(args, device)
        args.what = "suite"
    write_table(args, head, rows, extra)
    return train_in_time_left(args, started) if what == "gpu" else 0


def write_table(args, head, rows, extra):
    """<what>.md (the table, printed too) and <what>.csv in --output-dir."""
    lines = "".join(f"\n{k}: {v:.4g}" for k, v in extra.items() if v is not None)
    table = f"{args.what}: {head}\n\n" + markdown(rows, COLUMNS[args.what]) + lines + "\n"
    files.write_text(args.output_dir / f"{args.what}.md", table)
    files.write_csv(args.output_dir / f"{args.what}.csv", rows, sorted({k for r in rows for k in r}))
    report.console.print(table)
    report.console.print(
        f"wrote {args.output_dir / (args.what + '.md')} and {args.output_dir / (args.what + '.csv')}"
    )


def train_in_time_left(args, started):
    """bench gpu, after the suite: U-Net (bf16, channels-last, device pipeline) for as many epochs as
    the budget leaves, then the results table, curves and the suite's speed-up plot."""
    left = args.budget - (time.perf_counter() - started) - 45  # start-up, final test and plots
    out = args.output_dir / "unet-train"
    cmd = [
        sys.executable,
        str(ROOT / "unet" / "train.py"),
        "--data-dir",
        str(args.data_dir),
        "--cache-dir",
        str(args.cache_dir),
        "--image-size",
        str(args.image_size),
        "--width",
        str(args.train_width),
        "--epochs",
        "1000",
        "--time-limit",
        str(max(left, 1)),
        "--mixed-precision",
        "bf16",
        "--channels-last",
        "--data-pipeline",
        "device",
        "--output-dir",
        str(out),
    ]
    report.console.print(f"training, {left:.0f} s left: {' '.join(cmd)}")
    code = child(cmd, "bench gpu: the training run")
    if code == 0:
        tables = ["-m", "tools.results", str(out), "--suite", str(args.output_dir / "suite.csv")]
        code = child([sys.executable, *tables, "--output-dir", str(args.output_dir)], "bench gpu: tables")
    report.console.print(f"bench gpu: {time.perf_counter() - started:.0f} s in all")
    return code


if __name__ == "__main__":
    sys.exit(main())
