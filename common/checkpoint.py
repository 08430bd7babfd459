"""Checkpoints: best.pt (the best epoch's weights and the network's flags), last/ (Accelerate
state, written atomically, for --resume), and the checkpoints --checkpoint names (ensembles)."""

import json
import shutil
from pathlib import Path

import torch

from common import files
from common.errors import UserError


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


def save_epoch(run, epoch, val):
    """best.pt when validation Dice improved (every epoch without validation patients); last/ always."""
    if not val or val["dice"] > run.state.best_dice:
        run.state.best_dice, run.state.best_epoch = val.get("dice", run.state.best_dice), epoch
        weights = run.accelerator.get_state_dict(run.model)
        if run.main:
            ckpt = {"model": weights, "config": model_config(run.args), "epoch": epoch, "val": val}
            ckpt["split"] = run.split  # who it trained on travels with it, wherever it is copied
            files.save_torch(ckpt, run.out / "best.pt")
    save_last(run.accelerator, run.out)


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
        rows = [r for r in files.read_jsonl(run.out / "metrics.jsonl") if r["epoch"] <= run.state.epoch]
        files.write_text(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def load_checkpoint(path, model_name=None):
    """A best.pt (or the one in a run folder), checked to be of `model_name`."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt["config"]
        if not isinstance(ckpt.get("model"), dict) or not isinstance(config.get("model"), str):
            raise ValueError("no weights or no model named in it")
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"--checkpoint {path}: not a checkpoint of this repository ({reason})") from e
    if model_name is not None and config["model"] != model_name:
        raise UserError(f"--checkpoint {path} holds a {config['model']} model, not {model_name}")
    return ckpt


def split_of(path, ckpt=None):
    """The patients a checkpoint trained, validated and was tested on: the record it carries, else
    the split.json of its run folder (checkpoints from before they carried it). None: not known."""
    path = Path(path)
    best = path / "best.pt" if path.is_dir() else path
    ckpt = load_checkpoint(best) if ckpt is None else ckpt
    if ckpt.get("split") is not None:
        return ckpt["split"]
    beside = best.parent / "split.json"
    return files.read_json(beside) if beside.is_file() else None


def members(path):
    """The checkpoints --checkpoint names: a best.pt, a run folder's, or those of a folder of runs
    (the members of an ensemble, e.g. the folds of a --folds run)."""
    if path.is_file() or (path / "best.pt").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/best.pt"))
    if not found:
        raise UserError(f"--checkpoint {path}: no best.pt there or in its sub-folders")
    return found
