"""What a run prints and writes: the per-epoch lines, the final table, and the run folder's files
(each written to a temporary name and renamed, so an interrupted run never leaves half a file)."""

import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import track as progress_track
from rich.table import Table

from common.errors import UserError
from common.metrics import METRICS

console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line in logs

# (key in metrics.jsonl, column title, format)
EPOCH_COLUMNS = [
    ("epoch", "epoch", "{:d}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_miou_bg", "val mIoU+bg", "{:.4f}"),
    ("val_iou_tumor", "val IoU", "{:.4f}"),
    ("val_dice", "val Dice", "{:.4f}"),
    ("epoch_time_s", "time s", "{:.1f}"),
    ("images_per_s", "img/s", "{:.1f}"),
]


def tmp_name(path):
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(path, obj):
    replace(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_torch(obj, path):
    replace(Path(path), lambda tmp: torch.save(obj, tmp))


def replace(path, write):
    """write(tmp), then tmp renamed to path: the old file stays whole until the new one is. A failed
    write (a full disk) leaves no hidden temporary file and says so in one line."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = " (the previous one is intact)" if path.exists() else ""
        raise UserError(f"cannot write {path}{kept}: {getattr(e, 'strerror', None) or e}") from e


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    path = Path(path)
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def bar(enabled):
    """A progress bar on a terminal, for the main process only (other processes stay silent); cleared
    when done. Logs (Slurm, CI) get the per-epoch lines instead."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


def track(items, description):
    """Progress over items for the commands (predict, results), on a terminal."""
    return progress_track(
        items, description=description, console=console, transient=True, disable=not console.is_terminal
    )


def epoch_header():
    console.print(" ".join(f"{title:>{max(len(title), 8)}}" for _, title, _ in EPOCH_COLUMNS), style="bold")


def epoch_line(row):
    console.print(
        " ".join(
            f"{'-' if row.get(key) is None else fmt.format(row[key]):>{max(len(title), 8)}}"
            for key, title, fmt in EPOCH_COLUMNS
        )
    )


def results_table(title, results):
    """results: {"val (epoch 7)": {metric: value}, "test": {...}}."""
    table = Table(
        title=title,
        caption="orig.: mIoU+bg per batch of 4 as the original; slice, patient: "
        "mean Dice per tumour slice, per patient; HD95 in pixels",
    )
    table.add_column("set")
    shown = [m for m in METRICS if m.console]
    for m in shown:
        table.add_column(m.short, justify="right")
    for name, values in results.items():
        table.add_row(
            name, *("-" if values.get(m.key) is None else m.fmt.format(values[m.key]) for m in shown)
        )
    console.print(table)
