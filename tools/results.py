"""Turn run folders into a results table (markdown and CSV) and learning-curve plots; and speed
measurements into the speed study's figures.

    python -m tools.results runs/ --output-dir docs/studies/results-cpu
    python -m tools.results --sweep sweeps/sweep-unet.csv --suite docs/studies/gpu/suite.csv \\
        --output-dir docs/studies/speed

Each run argument is a run folder (holding summary.json) or a folder searched for them: writes
results.md, results.csv and curves-<model>.png (loss and validation Dice per epoch).
--sweep (from tools.sweep): sweep-time-<model>.png (the original study's figure: time per epoch
of the 3929 slices against processes, a bar per number of workers, for each pipeline),
sweep-breakdown.png (data wait / compute / rest per step) and sweep-scaling.png (scaling
efficiency against processes). --suite (from tools.bench suite): suite-speedup.png.
"""

import argparse
import sys
from pathlib import Path

from common import files, report
from common.cli import Parser
from common.errors import UserError, contract
from common.folders import make
from common.metrics import METRICS
from common.ranges import pathname

# the original study's reported numbers: per-batch mIoU incl. background, validation, leaky slice split
ORIGINAL = {"fcn": 0.8095, "unet": 0.8340, "segnet": 0.7802}
SETUP = [
    ("model", "model", "{}"),
    ("width", "width", "{:g}"),
    ("image_size", "px", "{}"),
    ("parameters", "params M", lambda v: f"{v / 1e6:.2f}"),
    ("gflops_per_image", "GFLOPs/img", "{:.2f}"),
    ("device", "device", "{}"),
    ("world_size", "procs", "{}"),
    ("epochs", "epochs", "{}"),
    ("train_time_s", "train s", "{:.0f}"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
]


def find_runs(paths):
    runs = []
    for p in map(Path, paths):
        found = [p] if (p / "summary.json").is_file() else sorted(q.parent for q in p.rglob("summary.json"))
        if not found:
            raise UserError(f"no run folder (with summary.json) in {p}")
        runs += found
    return runs


def cell(value, fmt="{:.4f}"):
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def data_label(summary):
    """What a run trained on, as tables name it; phantom runs are never tabled beside patients'."""
    d = summary.get("data")
    if d is None:
        return "data not recorded (a run of an older version)"
    name = "phantoms" if d["source"] == "phantoms" else Path(d["path"]).name
    return f"{name}, {d['patients']} patients"


def markdown(runs, summaries):
    groups = {}
    for run, s in zip(runs, summaries):
        groups.setdefault(data_label(s), []).append((run, s))
    lines = []
    for label, members in sorted(groups.items(), key=lambda g: g[0].startswith("phantoms")):
        lines += [f"## Data: {label}", ""] + section(members)
    lines += [
        "",
        "Reference, the original study (validation slices of a split that leaks patients, mIoU+bg "
        "per batch of 4): " + ", ".join(f"{m} {v:.4f}" for m, v in ORIGINAL.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def section(members):
    """The tables of runs on one data set: their setup, then test and validation metrics."""
    lines = ["| run | " + " | ".join(t for _, t, _ in SETUP) + " |", "|---" * (len(SETUP) + 1) + "|"]
    for run, s in members:
        lines.append(f"| {run.name} | " + " | ".join(cell(s.get(k), f) for k, _, f in SETUP) + " |")
    for side, key in (("Test patients", "test"), ("Validation patients, best epoch", "best_val")):
        lines += [
            "",
            f"**{side}**",
            "",
            "| run | " + " | ".join(m.title for m in METRICS) + " |",
            "|---" * (len(METRICS) + 1) + "|",
        ]
        for run, s in members:
            m = s.get(key) or {}
            lines.append(f"| {run.name} | " + " | ".join(cell(m.get(x.key), x.fmt) for x in METRICS) + " |")
    return lines + [""]


def write_csv(path, runs, summaries):
    keys = [k for k, _, _ in SETUP]
    header = ["run", *keys] + [f"{side}_{m.key}" for side in ("test", "val") for m in METRICS] + ["data"]
    rows = [
        [run.name, *(s.get(k) for k in keys)]
        + [(s.get(key) or {}).get(m.key) for key in ("test", "best_val") for m in METRICS]
        + [data_label(s)]
        for run, s in zip(runs, summaries)
    ]
    for model, v in ORIGINAL.items():
        rows.append(
            [f"original-{model}", model]
            + [None] * (len(keys) - 1)
            + [None] * len(METRICS)
            + [None, v]
            + [None] * (len(METRICS) - 2)
            + ["the original's leaky slice split"]
        )
    files.write_csv(path, [dict(zip(header, r)) for r in rows], header)


def curves(path, model, runs):
    plt, fig, (ax_loss, ax_dice) = plt_figure(1, 2, figsize=(10, 3.8))
    for run in runs:
        rows = files.read_jsonl(run / "metrics.jsonl")
        epochs = [r["epoch"] for r in rows]
        (line,) = ax_loss.plot(epochs, [r["train_loss"] for r in rows], label=f"{run.name} train")
        val_loss, val_dice = (
            [float("nan") if r.get(k) is None else r[k] for r in rows] for k in ("val_loss", "val_dice")
        )
        ax_loss.plot(epochs, val_loss, "--", color=line.get_color(), label=f"{run.name} val")
        ax_dice.plot(epochs, val_dice, color=line.get_color(), label=run.name)  # NaN: a --no-eval run
    ax_loss.set(title=f"{model}: training loss", xlabel="epoch")
    ax_dice.set(title=f"{model}: validation Dice", xlabel="epoch", ylim=(0, 1))
    ax_loss.legend(fontsize=7), ax_dice.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=90)
    plt.close(fig)


def plt_figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def bars(ax, groups, series, values, labels=None):
    """Grouped bars: values[(group, series)], the value printed on each bar."""
    width = 0.8 / max(len(series), 1)
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ys = [values.get((g, s), 0) for g in groups]
        rects = ax.bar(xs, ys, width, label=str(s) if labels is None else labels[j])
        ax.bar_label(rects, [f"{v:.3g}" if v else "" for v in ys], fontsize=6)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])


SWEEP_INTS = ("processes", "workers", "threads")
SWEEP_FLOATS = ("images_per_s", "s_per_3929", "step_ms", "step_data_ms", "step_compute_ms")


def sweep_figures(path, out):
    """sweep-time-<model>.png, sweep-breakdown.png and sweep-scaling.png of a tools.sweep table."""
    rows = files.read_csv(path, ("model", "pipeline", "threads_setting", *SWEEP_INTS, *SWEEP_FLOATS))
    try:
        for r in rows:
            r.update({k: int(r[k]) for k in SWEEP_INTS} | {k: float(r[k]) for k in SWEEP_FLOATS})
    except ValueError as e:
        raise UserError(f"--sweep {path}: not a tools.sweep table ({e})") from e
    written = [time_figure(out, model, [r for r in rows if r["model"] == model])
               for model in dict.fromkeys(r["model"] for r in rows)]  # fmt: skip
    return written + [breakdown_figure(out, rows), scaling_figure(out, rows)]


def saved(fig, path, plt):
    fig.tight_layout()
    files.save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def time_figure(out, model, mine):
    """Time per epoch against processes and workers, a panel per thread setting and pipeline."""
    panels = list(dict.fromkeys((r["threads_setting"], r["pipeline"]) for r in mine))
    plt, fig, axes = plt_figure(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (threads, pipeline) in zip(axes[0], panels):
        sel = [r for r in mine if (r["threads_setting"], r["pipeline"]) == (threads, pipeline)]
        procs, workers = sorted({r["processes"] for r in sel}), sorted({r["workers"] for r in sel})
        times = {(r["processes"], r["workers"]): r["s_per_3929"] for r in sel}
        bars(ax, procs, workers, times, [f"{w} workers" for w in workers])
        ax.set(title=f"{model}, {pipeline}, threads/process: {threads}", xlabel="processes",
               ylabel="s per epoch of 3929 slices")  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle(f"{mine[0]['device']}: time per epoch (lower is better)", fontsize=9)
    return saved(fig, out / f"sweep-time-{model}.png", plt)


def breakdown_figure(out, rows):
    """Each run's median step split into data wait, compute and the rest."""
    labels = [f"{r['model']} p{r['processes']} {r['pipeline']} w{r['workers']} t{r['threads']}" for r in rows]
    plt, fig, ax = plt_figure(figsize=(max(6, 0.45 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for key, name in (("step_data_ms", "data wait"), ("step_compute_ms", "compute"), ("step_ms", "rest")):
        ys = [r[key] - (r["step_data_ms"] + r["step_compute_ms"] if key == "step_ms" else 0) for r in rows]
        ys = [max(y, 0.0) for y in ys]
        ax.bar(range(len(rows)), ys, bottom=bottom, label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=6)
    ax.set(ylabel="ms per step (median)", title="where a step's time goes")
    ax.legend(fontsize=7)
    return saved(fig, out / "sweep-breakdown.png", plt)


def scaling_figure(out, rows):
    """Scaling efficiency: images/s over processes x the images/s of one process, per setting."""
    plt, fig, ax = plt_figure(figsize=(6, 3.8))
    setting = lambda r: (r["model"], r["pipeline"], f"w{r['workers']}", f"threads {r['threads_setting']}")  # noqa: E731
    for c in dict.fromkeys(map(setting, rows)):
        sel = sorted((r for r in rows if setting(r) == c), key=lambda r: r["processes"])
        one = next((r["images_per_s"] for r in sel if r["processes"] == 1), None)
        if one and len(sel) > 1:
            ys = [r["images_per_s"] / (one * r["processes"]) for r in sel]
            ax.plot([r["processes"] for r in sel], ys, "o-", label=" ".join(map(str, c)))
    ax.axhline(1, color="gray", lw=0.5)
    ax.set(xlabel="processes", ylabel="images/s / (processes x images/s of 1)", title="scaling efficiency")
    ax.legend(fontsize=6)
    return saved(fig, out / "sweep-scaling.png", plt)


def suite_figure(path, out):
    rows = files.read_csv(path, ("model", "setting", "speedup_vs_fp32_decode"))
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if not s.startswith("bare")]
    plt, fig, ax = plt_figure(figsize=(8, 4))
    bars(ax, models, settings, {(r["model"], r["setting"]): float(r["speedup_vs_fp32_decode"]) for r in rows})
    ax.set(ylabel="images/s relative to fp32 + decode", title="speed-up of each technique (higher is better)")
    ax.legend(fontsize=7)
    return [saved(fig, out / "suite-speedup.png", plt)]


def parser():
    p = Parser(
        prog="python -m tools.results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", type=pathname, help="run folders, or folders holding them")
    p.add_argument("--sweep", type=pathname, help="a CSV from tools.sweep")
    p.add_argument("--suite", type=pathname, help="a CSV from tools.bench suite")
    p.add_argument("--output-dir", type=pathname, default=Path("results"))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    return contract(lambda argv: results(parser().parse_args(argv)), argv)


def results(args):
    make(args.output_dir)
    written = (sweep_figures(args.sweep, args.output_dir) if args.sweep else []) + (
        suite_figure(args.suite, args.output_dir) if args.suite else []
    )
    if not args.runs:
        for path in written:
            report.console.print(f"wrote {path}")
        return 0
    runs, summaries = [], []
    for run in find_runs(args.runs):  # one odd folder costs its own line, not the table
        try:
            summaries.append(files.read_json(run / "summary.json"))
            runs.append(run)
        except UserError as e:
            print(f"note: {run} left out: {e}", file=sys.stderr)
    written += [args.output_dir / "results.md", args.output_dir / "results.csv"]
    files.write_text(written[-2], markdown(runs, summaries))
    write_csv(written[-1], runs, summaries)
    for model in dict.fromkeys(s["model"] for s in summaries):
        path = args.output_dir / f"curves-{model}.png"
        curves(path, model, [r for r, s in zip(runs, summaries) if s["model"] == model])
        written.append(path)
    report.console.print(markdown(runs, summaries))
    for path in written:
        report.console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
