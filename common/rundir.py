"""The run folder's owner: creating it, locking it, deciding whether a command resumes it, and its
records of what the run is (args.json, split.json)."""

import fcntl
import os
from datetime import datetime
from pathlib import Path

from common import files, report
from common.distributed import main_value
from common.errors import UserError
from common.folders import as_json, claim
from common.split import split_key

# flags that may differ when the same run is started again
UNCOMPARED = ("resume", "output_dir", "debug", "allow_missing", "time_limit", "log_with")


# defaults that changed: a run whose args.json predates the change resumes with the value it ran with
LEGACY = {"schedule": "constant", "normalize": "slice", "crop": "none", "tumour_share": 0, "fill_flair": 0.0}


PATH_FLAGS = ("data_dir", "cache_dir", "output_dir", "resume", "checkpoint", "pretrained")

# what the network sees and is: under --resume these stay the run's (another value would compare
# epochs of two inputs for "best", or not load the weights); other flags given again win
FIXED = ("model", "image_size", "crop", "normalize", "context", "width")


def recorded(folder):
    """A run folder's split.json, or None."""
    path = Path(folder) / "split.json"
    return files.read_json(path) if path.is_file() else None


def split_record(args, d):
    name = split_key(args.split)
    record = {
        "split": args.split,
        "seed": args.seed,
        "val_frac": args.val_frac,
        "test_frac": args.test_frac,
        "folds": args.folds,
        "fold": args.fold,
        "test_fold": args.test_fold,
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
        out = claim(args.output_dir, "run")
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
    saved = files.read_json(folder / "args.json")
    resumable, finished = has_checkpoint(folder), (folder / "summary.json").is_file()
    if args.resume is not None:
        fixed = [*FIXED, *(saved.get("network_flags") or ())]
        refuse_other(folder, args, saved, [k for k in fixed if k == "model" or k in args.given], "--resume")
    elif resumable or finished:
        refuse_other(folder, args, saved, ["model", *args.given], "--output-dir")
        args.resume = folder
    for key, value in {**LEGACY, **saved}.items() if args.resume is not None else ():
        if key not in args.given and key not in ("resume", "given"):
            setattr(args, key, Path(value) if key in PATH_FLAGS and value is not None else value)
    args.output_dir = folder
    if not resumable:
        why = "a finished --no-eval run" if finished else "it stopped in its first epoch"
        if os.environ.get("RANK", "0") == "0":  # before the processes are set up: one note per job
            report.console.print(f"note: no checkpoint in {folder} ({why}): starting afresh")
        args.resume = None
    return args


def refuse_other(folder, args, saved, keys, flag):
    """One line when a flag of `keys` differs from the run's own (its args.json)."""
    keys = [k for k in keys if k != "model" or "model" in saved]  # a record without it says nothing of it
    differ = [k for k in keys if k not in UNCOMPARED and as_json(getattr(args, k, None)) != saved.get(k)]
    if not differ:
        return
    k = differ[0]
    if k == "model":
        raise UserError(f"{flag} {folder} holds a {saved.get(k)} run, not {args.model}: pick another folder")
    said = f"--{k.replace('_', '-')} {saved.get(k)}, not {getattr(args, k)}"
    if flag == "--resume":
        raise UserError(f"--resume {folder}: the run was trained with {said} (what the network sees "
                        "stays the run's): start a new run for another")  # fmt: skip
    raise UserError(f"--output-dir {folder} holds a run made with {said}: continue it with --resume {folder} "
                    "(flags given again win), or pick another folder")  # fmt: skip
