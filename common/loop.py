"""The loop every model shares: Accelerate for devices, processes and precision; each epoch trains,
then validates on the validation patients; the best epoch (validation Dice) is tested at the end.

Run folder: args.json, split.json, metrics.jsonl (a line per epoch), summary.json, log.txt, best.pt
(weights of the best epoch) and last/ (Accelerate state of the last epoch, for --resume); its owner
is common/rundir.py, the checkpoints common/checkpoint.py's, the evaluation common/evaluate.py's.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, set_seed

from common import files, report
from common.checkpoint import load_last, save_epoch, save_last
from common.distributed import Preemption, main_value, sync_batchnorm
from common.errors import Unfinished, UserError
from common.evaluate import evaluate
from common.loss import loss_from_terms, loss_terms
from common.prepare import Data, load_data, make_accelerator, network_inputs, train_seed
from common.rundir import lock, make_run_dir, recorded, split_record
from common.summary import final_report
from common.timing import StepTimes, Stopwatch, peak_memory


class RunState:
    """Where a run stands; saved in every checkpoint so that --resume continues from it."""

    def __init__(self):
        self.epoch, self.best_dice, self.best_epoch, self.train_time_s = 0, -1.0, 0, 0.0
        self.planned_epochs = 0  # --budget: the epochs that fit, estimated after the first (0: --epochs)
        # an epoch stopped part-way (SIGTERM): its steps done, and its loss sum, images and seconds so far
        self.step, self.partial_loss, self.partial_seen, self.partial_time_s = 0, 0.0, 0, 0.0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def open_tracker(args, out, accelerator):
    """Accelerate's TensorBoard tracker in the run folder (main process), or None."""
    if args.log_with is None or not accelerator.is_main_process:
        return None
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker("tensorboard", out)
    tracker.store_init_configuration(
        {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    )
    return tracker


@dataclass
class Run:
    """What a training run holds between its steps."""

    args: object
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loaders: tuple  # train, val, test (prepared; test may be None)
    d: Data
    state: RunState
    out: Path
    tracker: object
    n_params: int
    lock: object  # the run folder's lock (main process)
    schedule: object = None  # the learning-rate scheduler of --schedule cosine
    split: dict = None  # the patients of each part (split.json), carried by every best.pt

    @property
    def main(self):
        return self.accelerator.is_main_process


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def make_schedule(args, optimizer, steps_per_epoch, state):
    """--schedule cosine: linear warm-up over the first --warmup share of the steps, then a cosine
    down to 0 at the last step (of --epochs, or of the epochs --budget plans: state.planned_epochs);
    stepped per optimiser step. None for a constant rate."""
    if args.schedule == "constant":
        return None

    def factor(step):
        total = (state.planned_epochs or args.epochs) * steps_per_epoch
        warm = round(args.warmup * total)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(args, build_model):
    """Processes, model, data, run folder, optimiser; the last checkpoint loaded with --resume."""
    accelerator = make_accelerator(args)
    # rank 0 draws what a 1-process run draws; DDP copies its weights to the others
    set_seed(train_seed(args), device_specific=True)
    model = build_model(args)
    d = load_data(args, accelerator, recorded(args.output_dir) if args.resume is not None else None)
    out = make_run_dir(args, accelerator)
    held = lock(out) if accelerator.is_main_process else None
    if held:
        report.console.keep(out / "log.txt")
    split = split_record(args, d)
    if accelerator.is_main_process and args.resume is None:
        for stale in ("metrics.jsonl", "best.pt", "summary.json"):  # of a run that stopped in its first epoch
            (out / stale).unlink(missing_ok=True)
        flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        files.write_json(out / "args.json", flags)
        files.write_json(out / "split.json", split)
    if args.sync_bn and accelerator.num_processes > 1:
        model = sync_batchnorm(model, accelerator.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer, *loaders = accelerator.prepare(
        model, make_optimizer(args, model), d.loaders["train"], d.loaders["val"], d.loaders["test"]
    )
    state = RunState()
    accelerator.register_for_checkpointing(state)
    steps = min(len(loaders[0]), args.max_steps or len(loaders[0]))
    schedule = make_schedule(args, optimizer, steps, state)
    if schedule is not None:  # its step count goes into every checkpoint: --resume continues the curve
        accelerator.register_for_checkpointing(schedule)
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    run = Run(args, accelerator, model, optimizer, tuple(loaders), d, state, out, None, n_params, held)
    run.schedule, run.split = schedule, split
    if args.resume is not None:
        load_last(run)
    run.tracker = open_tracker(args, out, accelerator)
    return run


def announce(run):
    a, args = run.accelerator, run.args
    report.console.print(
        f"[bold]{args.model}[/] width {args.width}: {run.n_params / 1e6:.2f} M parameters | "
        f"{a.num_processes} process(es) on {a.device.type} | "
        f"global batch {args.batch_size * a.num_processes} | precision {a.mixed_precision}\n"
        f"{', '.join(f'{k} {len(v)}' for k, v in run.d.parts.items())} slices | run folder {run.out}"
    )
    if args.resume is not None:
        at = f", step {run.state.step} of epoch {run.state.epoch + 1}" if run.state.step else ""
        report.console.print(f"resumed: {run.state.epoch} epochs done{at}")
    report.epoch_header()


def train(args, build_model):
    started = time.perf_counter()
    if args.log_with == "tensorboard" and not is_tensorboard_available():
        raise UserError("--log-with tensorboard: tensorboard is not installed (pip install tensorboard)")
    run = setup(args, build_model)
    planned = run.state.planned_epochs
    if planned and "epochs" in args.given and args.epochs > planned and run.state.epoch >= planned:
        raise UserError(
            f"--epochs {args.epochs}: this --budget run's cosine ended at epoch {planned}, the epochs its "
            f"budget fitted; start a new run (--budget or --epochs) to train longer"
        )
    if run.main:
        announce(run)
    stopped_by, first, preemption, epoch_s = None, run.state.epoch + 1, Preemption(), 0.0
    for epoch in range(first, args.epochs + 1):
        if run.state.planned_epochs and epoch > run.state.planned_epochs:
            break  # --budget: the schedule has ended
        # the main process decides for all: clocks differ between processes, and all must stop together
        late = time.perf_counter() - started + epoch_s > args.time_limit
        if args.time_limit and epoch > first and main_value(run.accelerator, late):
            stopped_by = f"--time-limit {args.time_limit:g} s before epoch {epoch}"
            if run.main:
                report.console.print(f"stopped: {stopped_by}")
            break
        epoch_stats = train_epoch(run, epoch, preemption)
        if epoch_stats is None:
            stopped_by = f"{preemption.name} at epoch {epoch}, step {run.state.step}"
            break
        val = {} if args.no_eval else validate(run)
        row = epoch_row(run, epoch, epoch_stats, val)
        epoch_s = row["epoch_time_s"]
        if args.budget and not run.state.planned_epochs:
            plan_budget(run, time.perf_counter() - started, epoch_s + val.get("eval_time_s", 0.0))
        if args.no_eval:
            continue
        save_epoch(run, epoch, val)
        if preemption.now(run.accelerator):
            stopped_by = f"{preemption.name} after epoch {epoch}"
            break
    if run.tracker:
        run.tracker.finish()
    if stopped_by and stopped_by.startswith(preemption.name):
        return pause(run, stopped_by)
    try:  # an error from here on must not cost the training: best.pt, last/ and metrics.jsonl stay
        summary = final_report(run, build_model, stopped_by)
    except Exception as e:
        if args.debug:
            raise
        raise Unfinished(
            f"training ended ({run.state.epoch} epochs: best.pt, last/ and metrics.jsonl are in {run.out}) "
            f"but the final evaluation failed ({type(e).__name__}: {e}); "
            f"finish it with: python {args.model}/train.py --resume {run.out}"
        ) from e
    run.accelerator.end_training()
    return summary


def plan_budget(run, elapsed, epoch_s):
    """--budget, after the first epoch: the epochs that fit in what is left of it (at the first's
    pace, validation included), at most --epochs; the cosine then spans them. Decided on the main
    process (clocks differ) and kept in the checkpoint, so a resumed run follows the same curve."""
    fit = run.state.epoch + int(max(0.0, run.args.budget - elapsed) // max(epoch_s, 1e-9))
    run.state.planned_epochs = main_value(run.accelerator, max(run.state.epoch, min(run.args.epochs, fit)))
    if run.main:
        report.console.print(
            f"--budget {run.args.budget:g} s: {run.state.planned_epochs} epochs fit at {epoch_s:.0f} s each"
        )


def train_step(run, x, y):
    """One optimiser step on a batch (and the schedule's); its loss, left on the device."""
    loss = loss_from_terms(loss_terms(run.model(x), y), run.args.loss)
    run.optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    run.optimizer.step()
    if run.schedule is not None:
        run.schedule.step()
    return loss.detach()


def train_epoch(run, epoch, preemption):
    """One pass over the training patients, from state.step when resuming part-way. Returns the
    epoch's figures, or None when SIGTERM stopped it (its progress then in run.state)."""
    args, accelerator, state, (train_loader, _, _) = run.args, run.accelerator, run.state, run.loaders
    device, sync = accelerator.device, args.step_timing or accelerator.device.type == "cpu"
    train_loader.set_epoch(epoch)
    run.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Stopwatch(device)
    times = StepTimes(clock, sync)
    done = state.step  # > 0 when resuming an epoch stopped part-way
    loss_sum = torch.tensor(state.partial_loss if run.main else 0.0, device=device)
    seen = torch.tensor(state.partial_seen if run.main else 0, device=device)
    first_bad = torch.zeros((), device=device, dtype=torch.long)  # step of the first non-finite loss
    steps = min(len(train_loader), args.max_steps or len(train_loader))
    batches = accelerator.skip_first_batches(train_loader, done) if done else train_loader
    with report.bar(run.main) as bar:  # the loss stays on the device: no host sync per step
        task = bar.add_task(f"epoch {epoch}/{args.epochs}", total=steps, completed=done)
        last = run.state.planned_epochs or args.epochs
        ticker = report.Ticker(run.main, f"epoch {epoch}/{args.epochs}", steps, epochs_after=last - epoch)
        for step, (images, masks, idx) in enumerate(batches, done + 1):
            times.waited()
            x, y = network_inputs(args, run.d, images, masks, idx, train=True)
            loss = train_step(run, x, y)
            times.computed()
            loss_sum += loss * len(x)
            seen += len(x)
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss), step, first_bad)
            bar.advance(task)
            ticker.tick(step, len(x), lambda: loss.item())
            times.done()
            if step == steps:
                break
            if step % Preemption.CHECK_EVERY == 0 and preemption.now(accelerator):
                state.step, state.partial_time_s = step, state.partial_time_s + clock.elapsed()
                state.partial_loss = accelerator.reduce(loss_sum, "sum").item()
                state.partial_seen = accelerator.reduce(seen, "sum").item()
                return None
    train_time = clock.elapsed() + state.partial_time_s
    state.step, state.partial_loss, state.partial_seen, state.partial_time_s = 0, 0.0, 0, 0.0
    timing = times.summary()
    figures = [train_time, timing["data_wait_s"], timing["compute_s"], timing["rest_s"]]
    figures.append(peak_memory(device)["peak_memory_mb"])
    per_rank = accelerator.gather(torch.tensor([figures], dtype=torch.float64, device=device)).cpu()
    loss_sum, seen = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(seen, "sum")
    check_finite(run, epoch, first_bad)
    return {
        "clock": clock,
        "timing": timing,
        "synced": sync,
        "per_rank": per_rank,
        "loss": loss_sum,
        "seen": seen,
    }


def check_finite(run, epoch, first_bad):
    """Checked once an epoch: a check per step would stall the device every step."""
    bad = run.accelerator.gather(first_bad.view(1))
    if bad.any():
        at = int(bad[bad > 0].min())
        kept = (
            f"the last good checkpoint (epoch {run.state.epoch}) is in {run.out / 'last'}"
            if run.state.epoch
            else "no epoch had finished: there is no checkpoint"
        )
        raise UserError(f"non-finite loss at epoch {epoch}, step {at} (lower --lr?); {kept}")


def validate(run):
    _, val_loader, _ = run.loaders
    if val_loader is None:  # --val-frac 0: nothing to choose an epoch on, the last is kept
        return {}
    return evaluate(
        run.model, val_loader, run.accelerator, run.args, run.d, "validating" if run.main else None
    )


def epoch_row(run, epoch, e, val):
    """The epoch's line of metrics.jsonl (written, printed and logged by the main process). The
    slowest process sets the pace: its times stand for the epoch."""
    timing, per_rank = e["timing"], e["per_rank"]
    slowest = per_rank[per_rank[:, 0].argmax()].tolist()
    row = {
        "epoch": epoch,
        "train_loss": e["loss"].item() / max(e["seen"].item(), 1),
        "val_loss": val.get("loss"),
        **{f"val_{k}": v for k, v in val.items() if k != "loss"},
        "lr": run.optimizer.param_groups[0]["lr"],  # at the epoch's end (--schedule)
        "epoch_time_s": e["clock"].elapsed(),
        "train_time_s": slowest[0],
        "images_per_s": e["seen"].item() / slowest[0],
        "peak_memory_mb": per_rank[:, 4].max().item(),
        **{k: timing[k] for k in ("step_median_s", "steps", "step_timing_synced")},
    }
    # without a sync per step the host runs ahead until the device's queue is full, then blocks
    # wherever it next waits (often in fetching the next batch): that is no data wait, so unsynced
    # runs do not report one (measured on an H200: 39% "data wait" unsynced, 2% with --step-timing)
    waits = {
        "data_wait_s": slowest[1],
        "compute_s": slowest[2],
        "rest_s": slowest[3],
        "data_wait_share": slowest[1] / slowest[0],
        "step_data_median_s": timing["step_data_median_s"],
        "step_compute_median_s": timing["step_compute_median_s"],
    }
    row.update({k: v if e["synced"] else None for k, v in waits.items()})
    run.state.epoch, run.state.train_time_s = epoch, run.state.train_time_s + slowest[0]
    if run.main:
        files.append_jsonl(run.out / "metrics.jsonl", row)
        report.epoch_line(row)
        if run.tracker:
            run.tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
    return row


def pause(run, stopped_by):
    """SIGTERM or Ctrl-C: save where the run stands (part-way through an epoch if need be) and stop."""
    if run.state.step:
        save_last(run.accelerator, run.out)
    if run.main:
        report.console.print(
            f"stopped by {stopped_by}: checkpoint in {run.out / 'last'}; continue with --resume {run.out}"
        )
    run.accelerator.end_training()
    return None
