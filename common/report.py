"""What a run prints and writes: the per-epoch lines, the final table, and the run folder's files
(each written to a temporary name and renamed, so an interrupted run never leaves half a file)."""

import json
import os
from pathlib import Path

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

from common.errors import UserError, discard
from common.metrics import METRICS


class Tee(Console):
    """The console, and a copy of what it prints in the run folder's log.txt once `keep` names it
    (what was printed before, such as the notes on how the run starts, goes there first)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.copy, self.early = None, []

    def release(self):
        """No copy, nothing kept: a new command starts (in-process callers run several)."""
        self.close()
        self.early = []

    def close(self):
        if self.copy is not None:
            self.copy.file.close()
            self.copy = None

    def keep(self, path):
        self.close()
        self.copy = Console(file=open(path, "a", buffering=1), highlight=False, soft_wrap=True, width=120)
        for args, kw in self.early:
            self.copy.print(*args, **kw)
        self.early = []

    def print(self, *args, **kw):
        super().print(*args, **kw)
        if self.copy is not None:
            self.copy.print(*args, **kw)
        elif len(self.early) < 100:
            self.early.append((args, kw))


console = Tee(highlight=False, soft_wrap=True)  # long paths stay on one line in logs


class Ticker:
    """Progress in a log (Slurm's .out, a file, CI), where no bar is drawn: a line every `every`
    seconds with the step, images/s, loss and the time left. `loss` is read only then (a sync)."""

    def __init__(self, enabled, title, total, every=30.0, epochs_after=0):
        import time

        self.clock, self.title, self.total, self.every = time.perf_counter, title, total, every
        self.epochs_after = epochs_after  # the run's epochs after this one, for its estimate
        self.enabled = enabled and not console.is_terminal
        self.start = self.last = self.clock()
        self.images, self.first = 0, None

    def tick(self, step, images, loss):
        if not self.enabled:
            return
        self.images += images
        self.first = step - 1 if self.first is None else self.first  # a resumed epoch starts part-way
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last, rate = now, self.images / (now - self.start)
        per_step = (now - self.start) / (step - self.first)
        left = per_step * (self.total - step)
        run_left = left + self.epochs_after * per_step * self.total  # training only, at this pace
        from datetime import datetime

        console.print(
            f"{datetime.now():%H:%M:%S} {self.title}: step {step}/{self.total}, {rate:.1f} img/s, "
            f"loss {loss():.4f}, {left:.0f} s left"
            + (f", the run ~{run_left / 60:.0f} min" if self.epochs_after else "")
        )


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


def read_json(path, kind=dict):
    """A JSON file the project wrote: a `kind` (an object), or one line naming the file when it is
    missing, empty, damaged or of another shape."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = "empty" if path.is_file() and not path.stat().st_size else f"damaged: {e}"
        raise UserError(f"{path} is {why}; restore it, or remove the folder it is in") from e
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged: a JSON {type(value).__name__}, not an object")
    return value


def read_csv(path, columns=()):
    """The rows of a CSV the project wrote, each a dict of strings; one line naming the file when it
    is missing, not text, or lacks one of `columns` (a row missing a cell: also one line)."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is damaged ({e}): restore it, or make it again") from e
    lacking = [c for c in columns if not rows or c not in rows[0]]
    if lacking or any(None in r.values() or None in r for r in rows):
        said = f"no column {lacking[0]}" if lacking else "a row is cut short"
        raise UserError(f"{path} is damaged or of another kind ({said}): restore it, or make it again")
    return rows


def write_csv(path, rows, fields=None):
    """Rows (dicts) as a CSV, whole or not at all; columns `fields`, or every key in first-seen order."""
    import csv

    fields = fields or list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    replace(Path(path), write)


def write_json(path, obj):
    replace(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(path, text):
    replace(Path(path), lambda tmp: tmp.write_text(text))


def save_torch(obj, path):
    import torch  # here only: the tools that write tables need none

    replace(Path(path), lambda tmp: torch.save(obj, tmp))


def save_figure(fig, path, dpi):
    """A matplotlib figure, its format told by the name (the temporary name has none)."""
    path = Path(path)
    replace(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:]))


def replace(path, write):
    """write(tmp), then tmp renamed to path: the old file stays whole until the new one is. A failed
    write (a full disk) leaves no hidden temporary file and says so in one line; every result the
    project writes goes through here (tests/test_writes.py)."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        discard(tmp)
        kept = " (the previous one is intact)" if path.exists() else ""
        raise UserError(f"cannot write {path}{kept}: {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        discard(tmp)
        raise


def append_jsonl(path, row):
    """One line more of an append-only log (metrics.jsonl): a crash mid-write tears only its last line,
    which read_jsonl drops."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The rows of an append-only log; a torn last line (a crash mid-write) is dropped and said, a
    damaged line before it is an error naming the file."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    rows = []
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(lines) - 1:
                console.print(f"note: {path}: its last line is torn (a write cut short): left out")
                break
            raise UserError(
                f"{path}: line {k + 1} is not a row ({e}): restore the file or remove the run"
            ) from e
        rows.append(row)
    return rows


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
