"""What a run prints: the console (and its copy in the run folder's log.txt), progress, the
per-epoch lines and the final table. What it writes and reads back: common/files.py."""

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
