"""The loop every model shares: Accelerate for devices, processes and precision; each epoch trains,
then validates on the validation patients; the best epoch (validation Dice) is tested at the end.

Run folder: args.json, split.json, metrics.jsonl (a line per epoch), summary.json, best.pt (weights
of the best epoch) and last/ (Accelerate state of the last epoch, for --resume).
"""

import fcntl
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import is_tensorboard_available, set_seed

from common import data, metrics, report, synthetic
from common.blocks import Averaged
from common.distributed import Preemption, main_value, on_main_first, sync_batchnorm
from common.errors import Unfinished, UserError
from common.timing import StepTimes, Stopwatch, default_threads, device_name, gflops, peak_memory

# flags that may differ when the same run is started again
UNCOMPARED = ("resume", "output_dir", "debug", "allow_missing", "time_limit", "log_with")
# defaults that changed: a run whose args.json predates the change resumes with the value it ran with
LEGACY = {"schedule": "constant", "normalize": "slice", "crop": "none"}
PATH_FLAGS = ("data_dir", "cache_dir", "output_dir", "resume", "checkpoint", "pretrained")
# what decides speed, recorded in summary.json beside the figures
SPEED_FLAGS = (
    "data_pipeline",
    "num_workers",
    "channels_last",
    "compile",
    "sync_bn",
    "threads",
    "max_steps",
    "step_timing",
)


def loss_terms(logits, target):
    """Per slice (B, 4): mean BCE, and the soft-Dice sums (sum p*t, sum p, sum t)."""
    logits, dims = logits.float(), (1, 2, 3)
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    return torch.stack([bce, (p * target).sum(dims), p.sum(dims), target.sum(dims)], 1)


def loss_from_terms(terms, kind):
    """BCE (mean over slices) and/or soft Dice pooled over all slices of the batch or set: a slice
    without tumour then counts through its false positives, not as a Dice of its own (which would
    be ~1 for any probability mass and drown the signal)."""
    loss = terms.new_zeros(())
    if "bce" in kind:
        loss = loss + terms[:, 0].mean()
    if "dice" in kind:
        inter, p, t = terms[:, 1:].sum(0)
        loss = loss + 1 - (2 * inter + 1) / (p + t + 1)
    return loss


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


def train_seed(args):
    """Seeds the weights, the augmentation and the batch order; --seed alone also seeds the split."""
    return args.seed if getattr(args, "train_seed", None) is None else args.train_seed


def make_accelerator(args):
    # cpu=True where there is no accelerator: torchrun-started CPU processes (accelerate launch with
    # MULTI_GPU + use_cpu) are told nothing else, and would otherwise not join a gloo group
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=args.mixed_precision,
        dynamo_backend="inductor" if args.compile else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_seed(args)),
    )
    args.threads = args.threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(args.threads)
    # denormal floats (from resampled inputs) slow x86 arithmetic several-fold; as values they are 0
    torch.set_flush_denormal(True)
    return accelerator


@dataclass
class Data:
    slices: list  # data.Slice per cached slice, sorted by patient then slice number
    cache: data.Cache  # the arrays, and each slice's native geometry
    parts: dict  # "train"/"val"/"test" -> slice indices
    loaders: dict  # "train"/"val"/"test" -> DataLoader, or None for an empty part
    notes: list  # how the data differ from a recorded split (with --allow-missing)
    stats: torch.Tensor = None  # (N, 8) volume statistics with --normalize volume, on the device


def load_data(args, accelerator, record=None):
    """Slices, their cached arrays, the split and the loaders (identical on every process). With
    `record` (a run's split.json) the split is the recorded one, not one computed from the flags."""

    def prepare():
        if args.synthetic:
            args.data_dir = synthetic.ensure_phantoms(args.cache_dir)
        return data.open_dataset(
            args.data_dir, args.cache_dir, args.image_size, accelerator.is_main_process, args.crop
        )

    slices, cache = on_main_first(accelerator, prepare)
    if record is None:
        parts, notes = (
            data.split(
                slices,
                args.split,
                args.val_frac,
                args.test_frac,
                args.seed,
                cache.tumour,
                args.folds,
                args.fold,
            ),
            [],
        )
    else:
        parts, notes = recorded_split(args, accelerator, slices, record)
    pin = accelerator.device.type == "cuda" if args.pin_memory is None else args.pin_memory
    sampler = None
    if args.tumour_share and parts["train"]:
        sampler = data.TumourShare(cache.tumour[parts["train"]], args.tumour_share, train_seed(args))
    loaders = data.loaders(
        parts,
        args.data_pipeline,
        slices,
        cache.images,
        cache.masks,
        args.image_size,
        args.batch_size,
        args.num_workers,
        pin,
        accelerator.device,
        args.context,
        cache.boxes,
        sampler,
    )
    stats = (
        torch.from_numpy(np.array(cache.stats)).to(accelerator.device) if args.normalize == "volume" else None
    )
    return Data(slices, cache, parts, loaders, notes, stats)


def inputs(args, d, images, masks, idx, train=False):
    """A batch as the network takes it: augmented when training, normalised as --normalize says."""
    stats = None if d.stats is None else d.stats[idx.to(d.stats.device)]
    augment = (args.flip, args.rotate, args.scale) if train else (0.0, 0.0, 0.0)
    return data.to_inputs(images, masks, *augment, args.channels_last, stats)


def recorded(folder):
    """A run folder's split.json, or None."""
    path = Path(folder) / "split.json"
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_split(args, accelerator, slices, record):
    """The run's own split (its split.json), whatever the flags say: flags given that contradict it
    are refused, since another split would put training patients in validation or test."""
    for key in data.SPLIT_FLAGS:
        if key in args.given and getattr(args, key) != record[key]:
            raise UserError(
                f"--{key.replace('_', '-')} {getattr(args, key)}: the run was split with "
                f"--{key.replace('_', '-')} {record[key]} (its split.json); another split would test on "
                "patients it trained on"
            )
        setattr(args, key, record[key])
    parts, notes = data.split_from_record(slices, record, args.allow_missing)
    if accelerator.is_main_process:
        for note in notes:
            report.console.print(f"note: {note}")
    return parts, notes


def split_record(args, d):
    name = data.split_key(args.split)
    record = {
        "split": args.split,
        "seed": args.seed,
        "val_frac": args.val_frac,
        "test_frac": args.test_frac,
        "folds": args.folds,
        "fold": args.fold,
    }
    for side, idx in d.parts.items():
        record[side] = sorted({name(d.slices[i]) for i in idx})
        record[f"{side}_slices"] = len(idx)
    return record


def make_run_dir(args, accelerator, tag=""):
    if args.output_dir is None:
        base = Path("runs") / f"{args.model}{tag}-{datetime.now():%Y%m%d-%H%M%S}"
        out, k = base, 1
        while out.exists():
            k += 1
            out = base.with_name(f"{base.name}-{k}")
    else:
        out = args.output_dir
        if (out / "args.json").exists() and args.resume is None and (tag or has_checkpoint(out)):
            raise UserError(
                f"--output-dir {out} already holds a run: continue it with --resume {out}, or pick another"
            )
    out = Path(main_value(accelerator, str(out)))
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-check").touch()  # before the work whose results it will hold
            (out / ".write-check").unlink()
        except OSError as e:
            raise UserError(f"--output-dir {out}: cannot write there ({e.strerror or e})") from e
    return out


def lock(out):
    """The run folder, for this run only: a second process training it (a second --resume, the same
    command twice) would interleave epochs in metrics.jsonl. Held until the process ends."""
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise UserError(
            f"--output-dir {out}: another process is training this run (its .lock is held)"
        ) from e
    return handle


def has_checkpoint(folder):
    return (folder / "last").is_dir() or (folder / "last.old").is_dir()


def starting_point(args):
    """The same command run again always makes progress: a run folder with a checkpoint is resumed
    (when the flags given agree with the run's own), one without (stopped before its first epoch
    ended) is started afresh, with its own flags under --resume."""
    folder = args.resume if args.resume is not None else args.output_dir
    if folder is None or not (folder / "args.json").is_file():
        if args.resume is not None:
            raise UserError(f"--resume {args.resume}: no run there (expected args.json and last/)")
        return args
    saved = json.loads((folder / "args.json").read_text())
    if args.resume is None and has_checkpoint(folder):
        differ = [k for k in args.given if k not in UNCOMPARED and as_json(getattr(args, k)) != saved.get(k)]
        if differ:
            flag = "--" + differ[0].replace("_", "-")
            raise UserError(
                f"--output-dir {folder} holds a run made with {flag} {saved.get(differ[0])}, not "
                f"{getattr(args, differ[0])}: continue it with --resume {folder} (flags given again win), "
                "or pick another folder"
            )
        args.resume = folder
    for key, value in {**LEGACY, **saved}.items() if args.resume is not None else ():
        if key not in args.given and key not in ("resume", "given"):
            setattr(args, key, Path(value) if key in PATH_FLAGS and value is not None else value)
    args.output_dir = folder
    if not has_checkpoint(folder):
        if os.environ.get("RANK", "0") == "0":  # before the processes are set up: one note per job
            report.console.print(
                f"note: no checkpoint in {folder} (it stopped in its first epoch): starting afresh"
            )
        args.resume = None
    return args


def as_json(value):
    """A flag's value as args.json holds it."""
    return json.loads(json.dumps(value, default=str))


def save_last(accelerator, out):
    """Accelerate state (model, optimiser, scaler, RNG, RunState) into last/, atomically: a new state
    goes to last.tmp, then replaces last; a kill at any moment leaves a whole last/ (or last.old/)."""
    tmp, last, old = out / "last.tmp", out / "last", out / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except (OSError, RuntimeError) as e:  # a full disk: the previous checkpoint stays whole
        shutil.rmtree(tmp, ignore_errors=True)
        kept = (
            f"the previous checkpoint is intact in {last}" if last.exists() else "there is no checkpoint yet"
        )
        raise UserError(
            f"cannot write the checkpoint in {out}: {getattr(e, 'strerror', None) or e}; {kept}"
        ) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if last.exists():
            shutil.rmtree(old, ignore_errors=True)
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def evaluate(model, loader, accelerator, args, d, title=None, volumes=False):
    """Metrics of the whole loader, exact under DDP (gather_for_metrics drops the padding). Slice and
    patient metrics from per-slice counts; with volumes, also the 3-D ones (largest-component Dice,
    HD95) from the gathered predicted masks, computed on the main process only."""
    model.eval()
    started = time.perf_counter()
    counts, terms, index, preds = [], [], [], []
    cache = d.cache
    size = tuple(int(v) for v in cache.shapes.max(0))
    with report.bar(accelerator.is_main_process and title is not None) as bar:
        for images, masks, idx in bar.track(loader, description=title or ""):
            x, y = inputs(args, d, images, masks, idx)
            logits = model(x)
            at = idx.cpu().numpy()  # scored at native resolution, against the masks as released
            native = metrics.native_logits(logits, cache.shapes[at], cache.boxes[at], size)
            truth = torch.from_numpy(cache.native_masks(at)).to(native.device)
            areas = torch.from_numpy(cache.shapes[at].prod(1))
            out = (metrics.confusion(native, truth, areas), loss_terms(logits, y), idx) + (
                (native > 0,) if volumes else ()
            )
            out = accelerator.gather_for_metrics(out)
            counts.append(out[0]), terms.append(out[1]), index.append(out[2])
            if volumes:
                preds.append(out[3].cpu())
    index = torch.cat(index).cpu()
    order = torch.argsort(index)  # slice order: patient, then slice number
    index, counts, terms = index[order].numpy(), torch.cat(counts).cpu()[order], torch.cat(terms).cpu()
    patients = [d.slices[i].patient for i in index]
    result = {
        **metrics.summarize(counts, patients),
        "loss": loss_from_terms(terms, args.loss).item(),
        "slices": len(counts),
        "patients": len(set(patients)),
        "scored_at": metrics.SCORED_AT,
    }
    if volumes and accelerator.is_main_process:
        pred, truth = torch.cat(preds)[order].numpy(), cache.native_masks(index)
        result.update(metrics.volume_metrics(pred, truth, patients, cache.shapes[index].prod(1)))
    result["eval_time_s"] = time.perf_counter() - started  # the 3-D metrics included; .cpu() synchronised
    return result


def model_config(args):
    """What defines the network: stored in checkpoints, taken from them by --eval-only and predict."""
    return {
        "model": args.model,
        "width": args.width,
        "image_size": args.image_size,
        "context": args.context,
        "normalize": args.normalize,
        "crop": args.crop,
        **{k: getattr(args, k) for k in args.network_flags},
    }


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
    if accelerator.is_main_process and args.resume is None:
        for stale in ("metrics.jsonl", "best.pt", "summary.json"):  # of a run that stopped in its first epoch
            (out / stale).unlink(missing_ok=True)
        flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report.write_json(out / "args.json", flags)
        report.write_json(out / "split.json", split_record(args, d))
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
    run.schedule = schedule
    if args.resume is not None:
        load_last(run)
    run.tracker = open_tracker(args, out, accelerator)
    return run


def load_last(run):
    """--resume: the state of last/ (or last.old/), the flags given again winning over the saved ones."""
    last = run.out / "last" if (run.out / "last").is_dir() else run.out / "last.old"
    try:
        run.accelerator.load_state(last)
    except Exception as e:
        raise UserError(f"--resume {run.out}: cannot load {last} with these flags: {e}") from e
    for group in run.optimizer.param_groups:  # the optimiser's state carries the old values: flags win
        group.update(lr=run.args.lr, weight_decay=run.args.weight_decay)
    if run.schedule is not None:  # --lr given again is the new peak; the step count is the saved one
        run.schedule.base_lrs = [run.args.lr] * len(run.optimizer.param_groups)
        for group, factor in zip(run.optimizer.param_groups, run.schedule.lr_lambdas):
            group["lr"] = run.args.lr * factor(run.schedule.last_epoch)
    if run.main:  # drop epochs that ran after the last checkpoint
        rows = [r for r in report.read_jsonl(run.out / "metrics.jsonl") if r["epoch"] <= run.state.epoch]
        (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def announce(run):
    a, args = run.accelerator, run.args
    report.console.print(
        f"[bold]{args.model}[/] width {args.width}: {run.n_params / 1e6:.2f} M parameters | "
        f"{a.num_processes} process(es) on {a.device.type} | "
        f"global batch {args.batch_size * a.num_processes} | precision {a.mixed_precision}\n"
        f"{', '.join(f'{k} {len(v)}' for k, v in run.d.parts.items())} slices | run folder {run.out}"
    )
    report.epoch_header()


def train(args, build_model):
    started = time.perf_counter()
    args = starting_point(args)
    if args.log_with == "tensorboard" and not is_tensorboard_available():
        raise UserError("--log-with tensorboard: tensorboard is not installed (pip install tensorboard)")
    run = setup(args, build_model)
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
        checkpoint(run, epoch, val)
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
        ticker = report.Ticker(run.main, f"epoch {epoch}/{args.epochs}", steps)
        for step, (images, masks, idx) in enumerate(batches, done + 1):
            times.waited()
            x, y = inputs(args, run.d, images, masks, idx, train=True)
            loss = loss_from_terms(loss_terms(run.model(x), y), args.loss)
            run.optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            run.optimizer.step()
            if run.schedule is not None:
                run.schedule.step()
            times.computed()
            loss_sum += loss.detach() * len(x)
            seen += len(x)
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step, first_bad)
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
        report.append_jsonl(run.out / "metrics.jsonl", row)
        report.epoch_line(row)
        if run.tracker:
            run.tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
    return row


def checkpoint(run, epoch, val):
    """best.pt when validation Dice improved; last/ always."""
    if val["dice"] > run.state.best_dice:
        run.state.best_dice, run.state.best_epoch = val["dice"], epoch
        weights = run.accelerator.get_state_dict(run.model)
        if run.main:
            ckpt = {"model": weights, "config": model_config(run.args), "epoch": epoch, "val": val}
            report.save_torch(ckpt, run.out / "best.pt")
    save_last(run.accelerator, run.out)


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


def final_report(run, build_model, stopped_by):
    """The best epoch once more on validation and once on test, with the 3-D metrics too; then
    summary.json and the results table."""
    args, accelerator, state, out = run.args, run.accelerator, run.state, run.out
    _, val_loader, test_loader = run.loaders
    accelerator.wait_for_everyone()
    results = {}
    if not args.no_eval:
        best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
        accelerator.unwrap_model(run.model).load_state_dict(best["model"])
        model = Averaged([accelerator.unwrap_model(run.model)], mirror=True) if args.tta else run.model
        val = evaluate(model, val_loader, accelerator, args, run.d, volumes=True)
        if test_loader and not args.no_test:
            title = "testing" if run.main else None
            results["test"] = evaluate(model, test_loader, accelerator, args, run.d, title, volumes=True)
        if run.main:  # chosen on the validation patients, then applied to the test patients
            results = postprocess_all(args, {"val": val, **results})
        results = {f"val (epoch {state.best_epoch})": results.pop("val", val), **results}
    summary = run_summary(run, build_model, stopped_by, results)
    if run.main:
        report.write_json(out / "summary.json", summary)
        if results:
            report.results_table(
                f"{args.model}: {run.n_params / 1e6:.2f} M parameters, {state.epoch} epochs, "
                f"{state.train_time_s:.0f} s training",
                results,
            )
        report.console.print(
            f"wrote {out}/: args.json split.json metrics.jsonl summary.json log.txt"
            + ("" if args.no_eval else " best.pt last/")
            + (" tensorboard/" if run.tracker else "")
        )
    return summary


def run_summary(run, build_model, stopped_by, results):
    args, accelerator, state = run.args, run.accelerator, run.state
    rows = report.read_jsonl(run.out / "metrics.jsonl") if run.main else []
    medians = (
        "images_per_s",
        "data_wait_share",
        "step_median_s",
        "step_data_median_s",
        "step_compute_median_s",
    )
    return {
        **model_config(args),
        "parameters": run.n_params,
        "gflops_per_image": gflops(build_model, args),
        **{k: getattr(args, k) for k in SPEED_FLAGS},
        "pin_memory": run.d.loaders["train"].pin_memory,
        "device": device_name(accelerator.device),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "batch_size_per_process": args.batch_size,
        "global_batch_size": args.batch_size * accelerator.num_processes,
        "epochs": state.epoch,
        "train_time_s": state.train_time_s,
        # medians over the last epochs that have each figure (a resumed run may mix synced and unsynced)
        **{
            k: statistics.median(v) if (v := [r[k] for r in rows[-3:] if r.get(k) is not None]) else None
            for k in medians
        },
        "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
        "peak_memory_of": peak_memory(accelerator.device)["peak_memory_of"],
        "stopped_by": stopped_by,
        "postprocess": (results.get(f"val (epoch {state.best_epoch})") or {}).get("postprocess"),
        "best_epoch": state.best_epoch,
        "best_val": results.get(f"val (epoch {state.best_epoch})"),
        "test": results.get("test"),
        "split": {k: len(v) for k, v in run.d.parts.items()},
        "data": data_record(args, run.d),
    }


def data_record(args, d):
    """Where the run's data came from: tables keep runs on phantoms apart from runs on patients."""
    source = "phantoms" if args.synthetic else "pack" if Path(args.data_dir).is_file() else "folder"
    patients = len({s.patient for s in d.slices})
    return {"source": source, "path": str(args.data_dir), "patients": patients, "slices": len(d.slices)}


def load_checkpoint(path, model_name=None):
    """A best.pt (or the one in a run folder), checked to be of `model_name`."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt["config"]
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"--checkpoint {path}: not a checkpoint of this repository ({reason})") from e
    if model_name is not None and config["model"] != model_name:
        raise UserError(f"--checkpoint {path} holds a {config['model']} model, not {model_name}")
    return ckpt


def members(path):
    """The checkpoints --checkpoint names: a best.pt, a run folder's, or those of a folder of runs
    (the members of an ensemble, e.g. the folds of a --folds run)."""
    if path.is_file() or (path / "best.pt").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/best.pt"))
    if not found:
        raise UserError(f"--checkpoint {path}: no best.pt there or in its sub-folders")
    return found


def take_config(args, config, source):
    """A checkpoint's network flags onto args; those given that contradict it are refused."""
    for key, saved in config.items():
        if key == "model":
            continue
        if key != "image_size" and key in args.given and getattr(args, key) != saved:
            raise UserError(
                f"--checkpoint {source} holds a model of --{key.replace('_', '-')} {saved}, "
                f"not {getattr(args, key)}"
            )
        if key != "image_size" or key not in args.given:
            setattr(args, key, saved)


def members_split(args, paths, accelerator):
    """The split the members were trained on (split.json), and whether their validation patients are
    one set: folds each validate on other patients, so that together they trained on all of them."""
    records = [recorded(p if p.is_dir() else p.parent) for p in paths]
    if records[0] is None:
        if accelerator.is_main_process:
            report.console.print(f"note: no split.json beside {paths[0]}: the split comes from the flags")
        return None, True
    if any(r is None or r["test"] != records[0]["test"] for r in records):
        raise UserError(f"--checkpoint {args.checkpoint}: its runs were tested on different patients")
    same_val = all(r["val"] == records[0]["val"] for r in records)
    if not same_val and accelerator.is_main_process:
        report.console.print(
            "note: the members validated on different patients (folds) and trained on the others: "
            "only the test patients are evaluated"
        )
    return records[0], same_val


def postprocess_all(args, results):
    """--postprocess on every set of `results`; auto: chosen on "val" (none without it)."""
    chosen = args.postprocess
    if chosen == "auto":
        chosen = metrics.choose_postprocess(results["val"]["per_patient"]) if "val" in results else "none"
    return {name: metrics.with_postprocess(r, chosen) for name, r in results.items()}


def evaluate_checkpoint(args, build_model):
    """--eval-only: the checkpoint's network (or the ensemble of a folder of runs, --tta: with
    mirrored slices) on the validation and test sets of its split."""
    paths = members(args.checkpoint)
    ckpts = [load_checkpoint(p, args.model) for p in paths]
    if any(c["config"] != ckpts[0]["config"] for c in ckpts):
        raise UserError(f"--checkpoint {args.checkpoint}: its runs hold networks of different flags")
    take_config(args, ckpts[0]["config"], args.checkpoint)
    accelerator = make_accelerator(args)
    nets = []
    for path, ckpt in zip(paths, ckpts):
        nets.append(build_model(args))
        try:
            nets[-1].load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"--checkpoint {path}: weights do not fit the model ({e})") from e
    model = Averaged(nets, mirror=args.tta) if len(nets) > 1 or args.tta else nets[0]
    record, same_val = members_split(args, paths, accelerator)
    d = load_data(args, accelerator, record)
    d.loaders["val"] = d.loaders["val"] if same_val else None
    d.loaders["test"] = None if args.no_test else d.loaders["test"]
    out = make_run_dir(args, accelerator, tag="-eval")  # before the work: a folder we cannot write fails now
    if accelerator.is_main_process:
        report.console.keep(out / "log.txt")
    model = accelerator.prepare(model)
    main = accelerator.is_main_process
    results = {
        name: evaluate(
            model,
            accelerator.prepare(dl),
            accelerator,
            args,
            d,
            f"evaluating {name}" if main else None,
            volumes=True,
        )
        for name, dl in d.loaders.items()
        if dl is not None and name != "train"
    }
    if main:
        results = postprocess_all(args, results)
        report.write_json(
            out / "eval.json",
            {
                "checkpoint": str(args.checkpoint),
                "members": [str(p) for p in paths],
                "tta": args.tta,
                **model_config(args),
                "split": split_record(args, d),
                "split_notes": d.notes,
                **results,
            },
        )
        what = f"{len(paths)} members" if len(paths) > 1 else str(args.checkpoint)
        report.results_table(f"{args.model} from {what}{' with TTA' if args.tta else ''}", results)
        report.console.print(f"wrote {out / 'eval.json'}")
    accelerator.end_training()
    return results
