"""What a run uses, decided once, before its processes, data or folder are set up: the flags given,
then the run folder's own (--resume, or the same command again), the network of --checkpoint
(--eval-only), the split it was recorded with, the phantoms' folder and the threads. The record is
frozen from there on: no module changes what the run uses after it started."""

import argparse
import os

from common import report, rundir, synthetic
from common.checkpoint import load_checkpoint, members, split_of
from common.errors import UserError
from common.split import SPLIT_FLAGS
from common.timing import default_threads


class Resolved(argparse.Namespace):
    """The flags a run uses; setting one after resolution is a bug, raised as such."""

    def __init__(self, **values):
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError(f"--{key.replace('_', '-')}: a run's flags are resolved once (common.resolve)")


def resolved(args):
    """A frozen copy of `args` with everything the run uses decided (see the module's doc)."""
    values = dict(vars(args))
    if args.eval_only:
        paths, ckpts = checkpoints(args.checkpoint, args.model)
        values.update(network_of(args, ckpts[0]["config"]))
        record = members_split(args, paths, ckpts)[0]
    else:
        values = vars(rundir.starting_point(argparse.Namespace(**values)))
        record = rundir.recorded(values["output_dir"]) if values["resume"] is not None else None
    if record is not None:
        values.update(split_flags(args, record))
    if args.synthetic:
        values["data_dir"] = synthetic.phantoms_dir(args.cache_dir)
    values["threads"] = args.threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return Resolved(**values)


def checkpoints(checkpoint, model):
    """(paths, checkpoints) of --checkpoint's members, of one network."""
    paths = members(checkpoint)
    ckpts = [load_checkpoint(p, model) for p in paths]
    if any(c["config"] != ckpts[0]["config"] for c in ckpts):
        raise UserError(f"--checkpoint {checkpoint}: its runs hold networks of different flags")
    return paths, ckpts


def network_of(args, config):
    """A checkpoint's network flags, over the flags; those given that contradict it are refused."""
    out = {}
    for key, saved in config.items():
        if key == "model":
            continue
        if key != "image_size" and key in args.given and getattr(args, key) != saved:
            raise UserError(
                f"--checkpoint {args.checkpoint} holds a model of --{key.replace('_', '-')} {saved}, "
                f"not {getattr(args, key)}"
            )
        if key != "image_size" or key not in args.given:
            out[key] = saved
    return out


def split_flags(args, record):
    """The split flags of a recorded split (a run's split.json, a checkpoint's), whatever the flags
    say: flags given that contradict it are refused, since another split would put training
    patients in validation or test."""
    out = {}
    for key in SPLIT_FLAGS:
        value = record.get(key)  # test_fold: not in the records of older runs
        if key in args.given and getattr(args, key) != value:
            raise UserError(
                f"--{key.replace('_', '-')} {getattr(args, key)}: the run was split with "
                f"--{key.replace('_', '-')} {value} (its recorded split); another split would test on "
                "patients it trained on"
            )
        out[key] = value
    return out


def members_split(args, paths, ckpts, say=False):
    """The split the members were trained on (the one each carries, or its split.json), and whether
    their validation patients are one set: folds each validate on other patients, so that together
    they trained on all of them. A member whose patients are not known is refused: the flags' split
    could test it on patients it trained on."""
    records = [split_of(p, c) for p, c in zip(paths, ckpts)]
    for path, record in zip(paths, records):
        if record is None:
            raise UserError(
                f"--checkpoint {path}: which patients it trained on is not known (no split.json beside "
                "it; made before checkpoints carried it): scores from the flags' split could be on "
                "its training patients; evaluate it in its run folder"
            )
    if any(r["test"] != records[0]["test"] for r in records):
        raise UserError(f"--checkpoint {args.checkpoint}: its runs were tested on different patients")
    same_val = all(r["val"] == records[0]["val"] for r in records)
    if not same_val and say:
        report.console.print(
            "note: the members validated on different patients (folds) and trained on the others: "
            "only the test patients are evaluated"
        )
    return records[0], same_val
