"""A model of an epoch's time on N processes (one GPU each) with W DataLoader workers each,
calibrated on the original study's 1-GPU times and checked against its 2-4-GPU times; then the
same prediction for this project's pipelines on a 4-GPU node of the card measured in docs/studies/gpu.

    python docs/studies/scaling/scaling.py   # scaling.csv, scaling.png; prints the tables

Per process (rank) and step, with one batch per rank:
    compute = gpu + stretch * (cpu + data if W == 0 else cpu)
    supply  = stretch * data_per_worker / min(W, cores / N)       (W >= 1: workers decode meanwhile)
    step    = max(compute, supply) + unhidden all-reduce
    epoch   = steps(N) * step + validation / N + checkpoint + W * worker start (non-persistent workers)
all-reduce of B bytes on a ring of N: 2(N-1)/N * B / bandwidth + 2(N-1) * latency, in DDP's 25 MiB
buckets, hidden behind the backward pass except where it runs past it. stretch = 1 + contention *
(r - 1) once r, the threads that want a core during the ranks' CPU work (ranks x their threads, plus
the workers' busy share) over the cores, passes 1. docs/studies/scaling explains the inputs and results.
"""

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

# the library of the checkout this study is in (run from anywhere: python docs/studies/scaling/scaling.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import files
from common.cli import Parser
from common.errors import contract
from common.folders import make
from common.ranges import amount, count, pathname

# --- The original study (its README and code, bananighosh/hpml_project_lgg_mri_segmentation, May
# 2024): 4 V100-16GB, 4 CPUs, batch 16 per GPU, epoch 2 over all 3929 slices, no evaluation,
# DataLoader workers re-created every epoch.
ORIGINAL_S = {  # epoch-2 training seconds for 1 / 2 / 3 / 4 GPUs, per DataLoader workers
    "fcn": {0: (73.2, 41.3, 173.2, 272.8), 1: (62.0, 34.0, 24.8, 19.6), 8: (78.0, 51.5, 43.0, 39.7)},
    "unet": {0: (117.5, 63.1, 197.3, 301.1), 1: (105.0, 54.9, 37.9, 29.8), 8: (124.1, 74.7, 60.1, 51.4)},
    "segnet": {0: (92.6, 51.4, 192.7, 290.8), 1: (82.4, 44.2, 32.4, 24.6), 8: (100.6, 63.6, 60.5, 45.6)},
}  # SegNet 4 GPUs, 0 workers is printed as "~290.8" there
ORIGINAL_SLICES, BATCH, ORIGINAL_CORES = 3929, 16, 4
# Forward GFLOP per 256 px image at width 1.0 (docs/studies/gpu/suite.csv, gflops_per_image); the original's
# networks have the same layers. Forward + backward + optimiser ~ 3x forward.
GFLOP_FWD = {"fcn": 41.23, "unet": 130.69, "segnet": 80.03}
PARAMS_M = {"fcn": 20.10, "unet": 34.52, "segnet": 29.44}  # fp32 gradients: 4 bytes each
V100_FP32_TFLOPS = 15.7  # NVIDIA V100 SXM2 datasheet (PCIe: 14); no tensor cores in fp32
# Measured with the original's own code on a 2-core x86_64 CPU (2026-11-29, 22 patients, 256 px):
HERE_ORIGINAL_DECODE_IPS = 783  # its DataLoader at 0 workers, images/s on one core
HERE_SKLEARN_METRIC_S = 0.115  # its per-step scikit-learn confusion matrix, 16 x 256 x 256 pixels
HERE_WORKER_START_S = 0.1  # its non-persistent workers: ~85-110 ms to the first batch
# This project on a 2-core x86_64 CPU (docs/studies/speed section 3): 2 processes x 2 threads on 2
# cores ran 2.32x slower than 2 x 1 (decode, 0 workers: 355 s against 153 s): at r = 2, stretch 2.32.
CONTENTION_HERE = 1.32

# --- This project on one NVIDIA H200 (docs/studies/gpu section 1, batch 16, loop images/s) ---
H200_IPS = {"fcn": 951, "unet": 565, "segnet": 653}  # bf16 + channels-last, `device` pipeline
H200_VAL_PER_TRAIN = 1590 / 565  # U-Net validation 1,590 slices/s against 565 training (docs/studies/gpu s.4)
H200_CHECKPOINT_S = 0.55  # U-Net model + Adam state per epoch, at most (docs/studies/gpu section 4)
H200_CORES_PER_GPU = 16  # the CPU cores beside the measured H200 (docs/studies/gpu)
# This project's `decode` pipeline, per core (docs/studies/speed section 1, 256 px, batch 16):
DECODE_MAIN_IPS = 873  # in the main process (0 workers)
DECODE_WORKER_IPS = 1332 / 2  # 2 workers on 2 cores, the hand-over to the main process included
TRAIN_SLICES, VAL_SLICES = 3143, 786  # the original's 80/20 split of the 3929 slices


@dataclass(frozen=True)
class Link:
    """Effective all-reduce bus bandwidth (bytes/s) and latency per ring step (s): assumptions,
    below the cards' peaks on purpose (sources in docs/studies/scaling)."""

    name: str
    bandwidth: float
    latency: float


LINKS = {
    "v100-pcie": Link("PCIe Gen3", 10e9, 10e-6),  # 15.75 GB/s per direction peak
    "v100-nvlink": Link("NVLink 2", 40e9, 5e-6),  # 300 GB/s per GPU both ways, 1-2 links per hop
    "h200-nvlink": Link("NVLink 4", 300e9, 5e-6),  # 900 GB/s per GPU both ways
    "h200-pcie": Link("PCIe Gen5", 25e9, 10e-6),  # 64 GB/s per direction peak
}
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb default


@dataclass(frozen=True)
class Setup:
    """One model on one machine, per rank and step of BATCH images (seconds)."""

    gpu_s: float  # forward, backward, optimiser on the device
    cpu_s: float  # CPU work on the rank's critical path (the original: metrics, Python)
    data_s: float  # one core making a batch in the main process (0 workers)
    worker_data_s: float  # the same in a worker, hand-over included
    grad_bytes: float
    link: Link
    cores: int
    threads: int  # threads per rank that run its CPU work with 0 workers
    contention: float  # extra stretch per unit of oversubscription
    worker_start_s: float = 0.0  # per worker and epoch: non-persistent workers start again
    val_s: float = 0.0  # validation on one GPU, shared among the ranks
    checkpoint_s: float = 0.0


def steps_per_epoch(slices, n, batch=BATCH):
    """DistributedSampler pads to ceil(slices / n) per rank; the last batch may be short."""
    return math.ceil(math.ceil(slices / n) / batch)


def allreduce_s(n, nbytes, link):
    """Ring all-reduce: each byte crosses 2(N-1)/N links' worth of bandwidth in 2(N-1) steps."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth + 2 * (n - 1) * link.latency


def unhidden_allreduce_s(n, nbytes, link, backward_s):
    """DDP all-reduces a bucket as soon as its gradients exist, one bucket after another: with k
    equal buckets ready evenly over the backward pass, what runs past its end is
    max(one bucket, k buckets - the backward after the first bucket)."""
    if n == 1:
        return 0.0
    k = max(1, math.ceil(nbytes / DDP_BUCKET_BYTES))
    one = allreduce_s(n, nbytes / k, link)
    return max(one, k * one - backward_s * (1 - 1 / k))


def oversubscription(n, workers, s):
    """Threads that want a core while the ranks do their CPU work, over the cores. Ranks run in
    lock-step (the all-reduce joins them every step), so their CPU phases coincide: with 0 workers
    each rank's data transforms run on `threads` threads; with workers its main process runs the
    metrics on one, and each worker is busy for its share of the step."""
    if workers == 0:
        return n * s.threads / s.cores
    busy = min(workers, s.worker_data_s / (s.gpu_s + s.cpu_s))
    return n * (1 + busy) / s.cores


def stretch(r, contention):
    """How much longer CPU work takes with r threads per core: 1 up to one per core; beyond it each
    unit of excess adds `contention` times the work (threads wait at barriers for a descheduled
    partner, processes evict each other's caches; docs/studies/speed section 3 measured 1.32)."""
    return 1 + contention * max(0.0, r - 1)


def step_s(s, n, workers):
    """One step of one rank: its parts, and which of compute and data supply bounds it."""
    x = stretch(oversubscription(n, workers, s), s.contention)
    if workers == 0:
        compute, supply = s.gpu_s + x * (s.cpu_s + s.data_s), 0.0
    else:
        # the workers decode side by side, but no more of them at once than the rank's cores
        compute, supply = s.gpu_s + x * s.cpu_s, x * s.worker_data_s / min(workers, s.cores / n)
    comm = unhidden_allreduce_s(n, s.grad_bytes, s.link, backward_s=2 / 3 * s.gpu_s)
    return {
        "step_s": max(compute, supply) + comm,
        "compute_s": compute,
        "supply_s": supply,
        "allreduce_s": comm,
        "stretch": x,
        "bound": "data" if supply > compute else "compute + data" if workers == 0 and s.data_s else "compute",
    }


def epoch_s(s, n, workers, slices):
    """Training steps, then the per-epoch fixed costs; the parts are returned with the total."""
    part = step_s(s, n, workers)
    fixed = s.val_s / n + s.checkpoint_s + workers * s.worker_start_s
    steps = steps_per_epoch(slices, n)
    return {**part, "steps": steps, "fixed_s": fixed, "epoch_s": steps * part["step_s"] + fixed}


SERIES = ("study", "model", "pipeline", "workers", "interconnect")  # a line of a table: 1-4 GPUs


def cell(study, model, pipeline, workers, n, interconnect, e):
    """A row of the CSV: the setting, the predicted epoch and its parts."""
    parts = {k: e[k] for k in ("step_s", "steps", "fixed_s", "allreduce_s", "stretch", "bound")}
    return {"study": study, "model": model, "pipeline": pipeline, "workers": workers, "gpus": n,
            "interconnect": interconnect, "predicted_s": e["epoch_s"], **parts}  # fmt: skip


def pick(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


# --- The original: four free parameters, fitted on its nine 1-GPU cells ---
FREE = ("tflops", "cpu_s", "data_s", "worker_start_s")


def original_setup(model, theta, args, link="v100-pcie"):
    """The original's rank: the GPU time from the model's FLOPs at a fitted effective throughput (a
    per-model time and the shared CPU time cannot be told apart on one GPU; their ratio can)."""
    p = dict(zip(FREE, theta))
    return Setup(
        gpu_s=3 * GFLOP_FWD[model] * BATCH / (p["tflops"] * 1e3),
        cpu_s=p["cpu_s"],
        data_s=p["data_s"],
        worker_data_s=p["data_s"],
        grad_bytes=4 * PARAMS_M[model] * 1e6,
        link=LINKS[link],
        cores=ORIGINAL_CORES,
        threads=args.threads_per_rank,
        contention=args.contention,
        worker_start_s=p["worker_start_s"],
    )


def fit_original(args):
    """Least squares on log(predicted / measured) over the 1-GPU cells only."""
    from scipy.optimize import least_squares

    cells = [(m, w, times[0]) for m, row in ORIGINAL_S.items() for w, times in row.items()]

    def residuals(theta):
        return [
            math.log(epoch_s(original_setup(m, theta, args), 1, w, ORIGINAL_SLICES)["epoch_s"] / t)
            for m, w, t in cells
        ]

    fit = least_squares(residuals, x0=[20.0, 0.15, 0.05, 1.0], bounds=([1, 0, 0, 0], [200, 2, 2, 30]))
    return list(fit.x)


def original_rows(theta, args):
    """Every cell of the original's table: predicted against measured, with the error."""
    rows = []
    for model, row in ORIGINAL_S.items():
        for workers, times in row.items():
            for n, measured in enumerate(times, 1):
                e = epoch_s(original_setup(model, theta, args), n, workers, ORIGINAL_SLICES)
                nvlink = epoch_s(
                    original_setup(model, theta, args, "v100-nvlink"), n, workers, ORIGINAL_SLICES
                )
                rows.append(
                    {
                        **cell("original", model, "decode (original)", workers, n, "PCIe Gen3", e),
                        "fitted": n == 1,
                        "measured_s": measured,
                        "error_pct": 100 * (e["epoch_s"] / measured - 1),
                        "predicted_nvlink_s": nvlink["epoch_s"],
                    }
                )
    return rows


def contention_needed(theta, args):
    """The contention that fits the 0-worker 3-4-GPU cells alone (a diagnosis, not a prediction)."""
    from scipy.optimize import minimize_scalar

    cells = [(m, n, row[0][n - 1]) for m, row in ORIGINAL_S.items() for n in (3, 4)]

    def loss(c):
        a = with_contention(args, c)
        return sum(
            math.log(epoch_s(original_setup(m, theta, a), n, 0, ORIGINAL_SLICES)["epoch_s"] / t) ** 2
            for m, n, t in cells
        )

    return minimize_scalar(loss, bounds=(0, 100), method="bounded").x


def with_contention(args, contention):
    return argparse.Namespace(**{**vars(args), "contention": contention})


# --- This project on a 4-GPU node of H200s ---
PIPELINES = (("device", 0), ("decode", 0), ("decode", 1), ("decode", 8))


def h200_setup(model, pipeline, link, args, n):
    """bf16 + channels-last compute as measured on one H200; data from the per-core decode rates;
    threads per rank as this project sets them (cores / ranks); workers are persistent."""
    decoding = pipeline == "decode"
    return Setup(
        gpu_s=BATCH / H200_IPS[model],
        cpu_s=0.0,
        data_s=BATCH / DECODE_MAIN_IPS if decoding else 0.0,
        worker_data_s=BATCH / DECODE_WORKER_IPS,
        grad_bytes=4 * PARAMS_M[model] * 1e6,
        link=LINKS[link],
        cores=args.node_cores,
        threads=max(1, args.node_cores // n),
        contention=args.contention,
        val_s=VAL_SLICES / (H200_VAL_PER_TRAIN * H200_IPS[model]),
        checkpoint_s=H200_CHECKPOINT_S * PARAMS_M[model] / PARAMS_M["unet"],
    )


def h200_rows(args):
    rows = []
    for model in ORIGINAL_S:
        for pipeline, workers in PIPELINES:
            for link in ("h200-nvlink", "h200-pcie"):
                for n in (1, 2, 3, 4):
                    e = epoch_s(h200_setup(model, pipeline, link, args, n), n, workers, TRAIN_SLICES)
                    rows.append(cell("h200", model, pipeline, workers, n, LINKS[link].name, e))
    for r in rows:
        r["speedup"] = pick(rows, **{k: r[k] for k in SERIES}, gpus=1)[0]["predicted_s"] / r["predicted_s"]
    return rows


# --- Report ---
def summary(rows, needed):
    """Median absolute error of the fitted cells, of the predicted ones, of the predicted ones
    outside the 0-worker 3-4-GPU collapse, and of the 4-GPU ones at the contention the collapse needs."""
    orig = pick(rows, study="original")
    groups = {
        "fitted, 1 GPU": ([r for r in orig if r["fitted"]], "error_pct"),
        "predicted, 2-4 GPUs": ([r for r in orig if not r["fitted"]], "error_pct"),
        "predicted, 1 and 8 workers": ([r for r in orig if not r["fitted"] and r["workers"]], "error_pct"),
        "predicted, 0 workers, 3-4 GPUs": (
            [r for r in orig if not r["workers"] and r["gpus"] >= 3],
            "error_pct",
        ),
        f"1 and 8 workers, 4 GPUs, at the contention the line above needs ({needed:.1f})": (
            [r for r in orig if r["workers"] and r["gpus"] == 4],
            "error_at_needed_pct",
        ),
    }
    return {
        f"{name} ({len(sel)} cells)": statistics.median(abs(r[key]) for r in sel)
        for name, (sel, key) in groups.items()
    }


def original_table(rows):
    lines = ["| model | workers | 1 GPU | 2 GPUs | 3 GPUs | 4 GPUs |", "|---|---|---|---|---|---|"]
    for model in ORIGINAL_S:
        for workers in ORIGINAL_S[model]:
            cells = pick(rows, study="original", model=model, workers=workers)
            text = [f"{r['measured_s']:.1f} / {r['predicted_s']:.1f} ({r['error_pct']:+.0f}%)" for r in cells]
            lines.append(f"| {model} | {workers} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def h200_table(rows):
    head = "| model | pipeline | workers | 1 GPU | 2 GPUs | 3 GPUs | 4 GPUs | 4-GPU speed-up | bound |"
    lines = [head, "|---" * 9 + "|"]
    for model in ORIGINAL_S:
        for pipeline, workers in PIPELINES:
            nv, pc = (
                pick(rows, study="h200", model=model, pipeline=pipeline, workers=workers, interconnect=link)
                for link in ("NVLink 4", "PCIe Gen5")
            )
            text = [f"{a['predicted_s']:.2f} / {b['predicted_s']:.2f}" for a, b in zip(nv, pc)]
            text += [f"{nv[-1]['speedup']:.2f} / {pc[-1]['speedup']:.2f}", nv[0]["bound"]]
            lines.append(f"| {model} | {pipeline} | {workers} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def fit_table(theta, args):
    p = dict(zip(FREE, theta))
    gpu = ", ".join(f"{m} {1e3 * original_setup(m, theta, args).gpu_s:.0f} ms" for m in ORIGINAL_S)
    rows = [
        ("effective GPU throughput", f"{p['tflops']:.1f} TFLOP/s", f"V100 fp32 peak {V100_FP32_TFLOPS}"),
        ("GPU time per step", gpu, "-"),
        ("CPU work per step, critical path", f"{1e3 * p['cpu_s']:.0f} ms",
         f"its metric, here: {1e3 * HERE_SKLEARN_METRIC_S:.0f} ms"),
        ("making a batch, one core", f"{1e3 * p['data_s']:.0f} ms",
         f"its code, here: {1e3 * BATCH / HERE_ORIGINAL_DECODE_IPS:.0f} ms"),
        ("worker start, per worker and epoch", f"{p['worker_start_s']:.2f} s",
         f"its code, here: ~{HERE_WORKER_START_S} s"),
    ]  # fmt: skip
    return "\n".join(
        ["| parameter | fitted | for scale |", "|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def write_csv(path, rows):
    files.write_csv(
        path, [{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    )


def named(workers):
    return f"{workers} worker" + "s" * (workers != 1)


def plot(path, rows):
    """Top: the original's epoch times, measured (points) and predicted (lines); bottom: this
    project's predicted epochs on a 4-GPU H200 node, NVLink (solid) and PCIe (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    for ax, model in zip(axes[0], ORIGINAL_S):
        for workers, color in zip(ORIGINAL_S[model], ("C3", "C0", "C2")):
            cells = pick(rows, study="original", model=model, workers=workers)
            gpus, name = [r["gpus"] for r in cells], named(workers)
            ax.plot(gpus, [r["measured_s"] for r in cells], "o", color=color, label=f"{name}, measured")
            ax.plot(gpus, [r["predicted_s"] for r in cells], "-", color=color, label=f"{name}, predicted")
            if workers == 0:  # what the collapse would need: fitted to its own cells
                ax.plot(
                    gpus,
                    [r["predicted_at_needed_s"] for r in cells],
                    ":",
                    color=color,
                    label=f"{name}, contention fitted to 3-4 GPUs",
                )
        ax.set(title=f"{model}: the original (4 V100s, 4 CPUs)", yscale="log", ylabel="epoch s")
    axes[0][0].legend(fontsize=7)
    for ax, model in zip(axes[1], ORIGINAL_S):
        for (pipeline, workers), color, width in zip(PIPELINES, ("C1", "C3", "C0", "C2"), (5, 1.5, 1.5, 1.5)):
            for link, style in (("NVLink 4", "-"), ("PCIe Gen5", "--")):
                cells = pick(
                    rows, study="h200", model=model, interconnect=link, pipeline=pipeline, workers=workers
                )
                ax.plot(
                    [r["gpus"] for r in cells],
                    [r["predicted_s"] for r in cells],
                    style,
                    color=color,
                    lw=width,
                    alpha=0.6 if width > 2 else 1,
                    label=f"{pipeline}, {named(workers)}" if style == "-" else None,
                )
        ax.set(
            title=f"{model}: this project, H200 node (predicted)",
            xlabel="GPUs",
            ylabel="epoch s",
            ylim=(0, None),
            xticks=[1, 2, 3, 4],
        )
    axes[1][0].legend(fontsize=7, title="solid NVLink, dashed PCIe", title_fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def parser():
    p = Parser(
        prog="python docs/studies/scaling/scaling.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    out = "where scaling.csv and scaling.png go (default %(default)s)"
    p.add_argument("--output-dir", type=pathname, default=Path(__file__).resolve().parent, help=out)
    p.add_argument(
        "--threads-per-rank",
        type=count(1),
        default=2,
        help="the original's threads per rank for its 0-worker data path (default %(default)s: PyTorch "
        "uses the physical cores, assumed 2 behind its 4 vCPUs)",
    )
    p.add_argument(
        "--contention",
        type=amount(),
        default=CONTENTION_HERE,
        help="extra stretch per unit of oversubscription (default %(default)s, docs/studies/speed section 3)",
    )
    p.add_argument(
        "--node-cores",
        type=count(1),
        default=4 * H200_CORES_PER_GPU,
        help="CPU cores of the 4-GPU H200 node (default %(default)s: 16 per GPU, as beside the measured one)",
    )
    return p


def main(argv=None):
    return contract(lambda argv: model(parser().parse_args(argv)), argv)


def model(args):
    theta, rows = fit_original(args), []
    needed = contention_needed(theta, args)
    for r, alt in zip(original_rows(theta, args), original_rows(theta, with_contention(args, needed))):
        rows.append(
            {**r, "predicted_at_needed_s": alt["predicted_s"], "error_at_needed_pct": alt["error_pct"]}
        )
    rows += h200_rows(args)
    numbers = summary(rows, needed)
    make(args.output_dir)
    write_csv(args.output_dir / "scaling.csv", rows)
    plot(args.output_dir / "scaling.png", rows)
    print("Calibration on the original's 1-GPU cells\n\n" + fit_table(theta, args))
    print("\nThe original: measured / predicted epoch s (error), PCIe Gen3\n\n" + original_table(rows))
    print("\nMedian absolute error, %\n")
    print("\n".join(f"- {k}: {v:.1f}" for k, v in numbers.items()))
    print(f"\nThis project on a 4-GPU H200 node ({args.node_cores} cores): epoch s, NVLink / PCIe\n")
    print(h200_table(rows))
    print(f"\nwrote {args.output_dir / 'scaling.csv'} and {args.output_dir / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
