"""What a run or an evaluation stands on: the processes (Accelerate) and the data (slices, cache,
split, loaders), identical on every process."""

import os
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration

from common import data, report, synthetic
from common.cache import Cache, open_dataset
from common.cli import named
from common.distributed import on_main_first
from common.split import refuse_copies, split, split_from_record
from common.timing import default_threads


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
    # resolved before setup (common.resolve); the same rule for a caller that did not resolve them
    torch.set_num_threads(args.threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    # denormal floats (from resampled inputs) slow x86 arithmetic several-fold; as values they are 0
    torch.set_flush_denormal(True)
    return accelerator


@dataclass
class Data:
    slices: list  # data.Slice per cached slice, sorted by patient then slice number
    cache: Cache  # the arrays, and each slice's native geometry
    parts: dict  # "train"/"val"/"test" -> slice indices
    loaders: dict  # "train"/"val"/"test" -> DataLoader, or None for an empty part
    notes: list  # how the data differ from a recorded split (with --allow-missing)
    stats: torch.Tensor = None  # (N, 8) volume statistics with --normalize volume, on the device


def load_data(args, accelerator, record=None):
    """Slices, their cached arrays, the split and the loaders (identical on every process). With
    `record` (a run's split.json) the split is the recorded one, not one computed from the flags."""

    def prepare():
        if args.synthetic:  # its folder resolved before setup: written here, once
            synthetic.ensure_phantoms(args.cache_dir)
        return open_dataset(
            args.data_dir, args.cache_dir, args.image_size, accelerator.is_main_process, args.crop
        )

    slices, cache = on_main_first(accelerator, prepare)
    refuse_copies(slices, cache.images)
    if record is None:
        parts, notes = (
            split(
                slices,
                args.split,
                args.val_frac,
                args.test_frac,
                args.seed,
                cache.tumour,
                args.folds,
                args.fold,
                args.test_fold,
            ),
            [],
        )
    else:
        parts, notes = recorded_split(args, accelerator, slices, record)
    pin = accelerator.device.type == "cuda" if args.pin_memory is None else args.pin_memory
    sampler = None
    if args.tumour_share and parts["train"]:
        flag = named(args, "tumour_share")
        sampler = data.TumourShare(cache.tumour[parts["train"]], args.tumour_share, train_seed(args), flag)
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


def recorded_split(args, accelerator, slices, record):
    """The run's own split (its split.json), whatever the flags say: the flags that contradict it
    were refused when the run's flags were resolved (common.resolve.split_flags)."""
    parts, notes = split_from_record(slices, record, args.allow_missing)
    if accelerator.is_main_process:
        for note in notes:
            report.console.print(f"note: {note}")
    return parts, notes


def network_inputs(args, d, images, masks, idx, train=False):
    """A batch as the network takes it: augmented when training, normalised as --normalize says."""
    stats = None if d.stats is None else d.stats[idx.to(d.stats.device)]
    augment = (args.flip, args.rotate, args.scale) if train else (0.0, 0.0, 0.0)
    return data.to_inputs(
        images, masks, *augment, args.channels_last, stats, args.fill_flair if train else 0.0
    )
