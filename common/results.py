"""Turn run folders into a results table (markdown and CSV) and learning-curve plots.

    python -m common.results runs/ --output-dir docs/results

Each argument is a run folder (holding summary.json) or a folder searched for them. Writes
results.md, results.csv and curves-<model>.png (loss and validation Dice per epoch).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from common import report

# the original study's reported numbers: per-batch mIoU incl. background, validation, leaky slice split
ORIGINAL = {"fcn": 0.8095, "unet": 0.8340, "segnet": 0.7802}
SETUP = [("model", "model", "{}"), ("width", "width", "{:g}"), ("image_size", "px", "{}"),
         ("parameters", "params M", lambda v: f"{v / 1e6:.2f}"), ("gflops_per_image", "GFLOPs/img", "{:.2f}"),
         ("device", "device", "{}"), ("world_size", "procs", "{}"), ("epochs", "epochs", "{}"),
         ("train_time_s", "train s", "{:.0f}"), ("images_per_s", "img/s", "{:.1f}"), ("peak_memory_mb", "peak MB", "{:.0f}")]
SCORES = [("miou_bg", "mIoU+bg"), ("miou_bg_seed", "mIoU+bg per batch"), ("iou_tumor", "IoU"), ("dice", "Dice"),
          ("dice_slice", "Dice/slice"), ("empty_fp_rate", "empty FP"), ("dice_patient_mean", "Dice/patient mean"),
          ("dice_patient_median", "median"), ("dice_patient_lcc_mean", "+LCC mean"),
          ("hd95_patient_mean", "HD95 px"), ("hd95_excluded", "HD95 excl.")]


def find_runs(paths):
    runs = []
    for p in map(Path, paths):
        found = [p] if (p / "summary.json").is_file() else sorted(q.parent for q in p.rglob("summary.json"))
        if not found:
            raise SystemExit(f"error: no run folder (with summary.json) in {p}")
        runs += found
    return runs


def cell(value, fmt="{:.4f}"):
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def markdown(runs, summaries):
    lines = ["| run | " + " | ".join(t for _, t, _ in SETUP) + " |", "|---" * (len(SETUP) + 1) + "|"]
    for run, s in zip(runs, summaries):
        lines.append(f"| {run.name} | " + " | ".join(cell(s.get(k), f) for k, _, f in SETUP) + " |")
    for side, key in (("Test patients", "test"), ("Validation patients, best epoch", "best_val")):
        lines += ["", f"**{side}**", "", "| run | " + " | ".join(t for _, t in SCORES) + " |",
                  "|---" * (len(SCORES) + 1) + "|"]
        for run, s in zip(runs, summaries):
            m = s.get(key) or {}
            lines.append(f"| {run.name} | " + " | ".join(cell(m.get(k), "{}" if k == "hd95_excluded" else "{:.4f}")
                                                         for k, _ in SCORES) + " |")
    lines += ["", "Reference, the original study (validation slices of a split that leaks patients, mIoU+bg "
              "per batch of 4): " + ", ".join(f"{m} {v:.4f}" for m, v in ORIGINAL.items()) + "."]
    return "\n".join(lines) + "\n"


def write_csv(path, runs, summaries):
    keys = [k for k, _, _ in SETUP]
    header = ["run", *keys] + [f"{side}_{k}" for side in ("test", "val") for k, _ in SCORES]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for run, s in zip(runs, summaries):
            w.writerow([run.name, *(s.get(k) for k in keys)] + [(s.get(key) or {}).get(k) for key in ("test", "best_val")
                                                               for k, _ in SCORES])
        for model, v in ORIGINAL.items():
            w.writerow([f"original-{model}", model] + [None] * (len(keys) - 1) + [None] * len(SCORES) +
                       [None, v] + [None] * (len(SCORES) - 2))


def curves(path, model, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        rows = report.read_jsonl(run / "metrics.jsonl")
        epochs = [r["epoch"] for r in rows]
        line, = ax_loss.plot(epochs, [r["train_loss"] for r in rows], label=f"{run.name} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "--", color=line.get_color(), label=f"{run.name} val")
        ax_dice.plot(epochs, [r["val_dice"] for r in rows], color=line.get_color(), label=run.name)
    ax_loss.set(title=f"{model}: loss (BCE + soft Dice)", xlabel="epoch")
    ax_dice.set(title=f"{model}: validation Dice", xlabel="epoch", ylim=(0, 1))
    ax_loss.legend(fontsize=7), ax_dice.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m common.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding them")
    p.add_argument("--output-dir", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    runs = find_runs(args.runs)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = [args.output_dir / "results.md", args.output_dir / "results.csv"]
    written[0].write_text(markdown(runs, summaries))
    write_csv(written[1], runs, summaries)
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
