"""The kaggle_3m layout (patients, slices, their TIFFs read and checked), the datasets and loaders
over the decoded cache (common/cache.py), and batches prepared on the device.

A DataLoader batch is one fancy-indexing read of the cache; normalisation and augmentation then run
on the whole batch on the training device.
"""

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UserError, no_data
from common.pipelines import WORKERS

NAME = re.compile(r"^(?P<stem>(?P<patient>.+)_(?P<n>\d+))(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class Slice:
    patient: str
    n: int
    image: Path
    mask: Path


def discover(data_dir, masks=True):
    """All image/mask pairs of a kaggle_3m folder, sorted by patient then slice number. masks=False
    (predicting new scans): an image without its mask is a slice whose mask is None."""
    data_dir = Path(data_dir)
    hint = "--data-dir (default $LGG_DATA_DIR)"
    if not data_dir.exists():
        raise no_data(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder is not a folder: {data_dir} ({hint})")
    patients = sorted(p for p in data_dir.iterdir() if p.is_dir())
    if not patients:
        raise UserError(f"no patient folders in {data_dir}: expected <patient>/<patient>_<n>.tif ({hint})")
    slices, hidden, empty, gaps = [], [], [], []
    for folder in patients:
        images, found_masks = {}, {}
        for f in folder.iterdir():
            if f.name.startswith("."):  # macOS's ._ files, editors' and sync tools' own
                hidden.append(f)
            elif m := NAME.match(f.name):
                if not f.exists():
                    raise UserError(f"slice is a broken link: {f} -> {os.readlink(f)}")
                (found_masks if m["mask"] else images)[m["stem"]] = (int(m["n"]), f)
        check_names(folder, [f for _, f in (*images.values(), *found_masks.values())])
        numbers = sorted(n for n, _ in images.values())
        if not numbers:
            empty.append(folder.name)
        elif numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            gaps.append(folder.name)
        for stem in sorted(set(images) | set(found_masks)):
            if stem not in found_masks and masks:
                raise UserError(f"image without mask: {images[stem][1]} (expected {stem}_mask.tif beside it)")
            if stem not in images:
                raise UserError(f"mask without image: {found_masks[stem][1]} (expected {stem}.tif beside it)")
            n, image = images[stem]
            slices.append(Slice(folder.name, n, image, found_masks.get(stem, (None, None))[1]))
        if len(images) == 1:  # volumes have tens of slices: a lone one is what a half-extracted copy leaves
            raise UserError(f"patient folder {folder} holds a single slice: is the copy complete?")
    if not slices:
        inner = [p / "kaggle_3m" for p in (data_dir, *patients) if (p / "kaggle_3m").is_dir()]
        hint = f" (did you mean --data-dir {inner[0]}?)" if inner else ""
        raise UserError(f"no slices in {data_dir}: patient folders hold no <patient>_<n>.tif files{hint}")
    said(hidden, empty, gaps, len(patients))
    return sorted(slices, key=lambda s: (s.patient, s.n))


def said(hidden, empty, gaps, folders):
    """What discover left out or joined, in a line each: nothing of the data goes in silence."""
    if os.environ.get("RANK", "0") != "0":
        return
    notes = []
    if hidden:
        notes.append(f"{len(hidden)} hidden files (such as {hidden[0].name}) are not slices: ignored")
    if empty:
        notes.append(
            f"{len(empty)} of {folders} patient folders hold no slices ({', '.join(empty[:3])}): left out"
        )
    if gaps:
        notes.append(
            f"slice numbers skip in {len(gaps)} patients ({', '.join(gaps[:3])}): their neighbours "
            "(--context) and volumes (3-D metrics, NIfTI) join across the gaps"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def check_names(folder, files):
    """One patient per folder: slices named after another patient are used, and said; slices of
    several patients in one folder are an error (which would they be?)."""
    named = sorted({NAME.match(f.name)["patient"] for f in files})
    if len(named) > 1:
        some = ", ".join(named[:3])
        raise UserError(
            f"patient folder {folder} holds slices of {len(named)} patients ({some}): one per folder"
        )
    if named and named[0] != folder.name and os.environ.get("RANK", "0") == "0":
        print(
            f"note: {folder} holds slices named {named[0]}_<n>: used as patient {folder.name}",
            file=sys.stderr,
        )


def read_tiff(path, modes):
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in modes:
                raise UserError(f"{path}: expected a {'/'.join(modes)} TIFF, got mode {im.mode}")
            bits = max(getattr(im, "tag_v2", {}).get(258, (8,)) or (8,))
            if bits > 8:  # PIL would keep only the high byte of each sample
                raise UserError(f"{path}: {bits}-bit samples; kaggle_3m slices are 8-bit: convert it first")
            return np.array(im.convert(modes[0]))  # a writable copy: torch.from_numpy wants one
    except UserError:
        raise
    except PermissionError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    except Exception as e:  # PIL raises many types for broken files
        raise UserError(f"cannot decode {path}: {e}") from e


def read_mask(path, shape):
    """A mask as uint8 {0, 1}, checked against its image's (height, width)."""
    mask = read_tiff(path, ("L", "1"))
    if mask.shape != tuple(shape):
        raise UserError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {shape[1]}x{shape[0]}")
    values = np.unique(mask)
    if not (set(values) <= {0, 255} or set(values) <= {0, 1}):
        raise UserError(f"{path}: mask values must be 0/255 (or 0/1), found {values[:8].tolist()}")
    return (mask > 0).astype(np.uint8)


def read_native(s):
    """One slice as released: uint8 image (H, W, 3) and mask (H, W) in {0, 1}, checked."""
    image = read_tiff(s.image, ("RGB",))
    return image, read_mask(s.mask, image.shape[:2])


def read_pair(s, size, box=None):
    """One slice as uint8 arrays (size x size x 3, size x size in {0, 1}), checked; `box` (top, left,
    bottom, right): the part of the slice to keep (--crop brain), zero outside the slice."""
    return shrink(*read_native(s), size, box)


def shrink(image, mask, size, box=None):
    """A native (image, mask) as the network sees it: the box cut out (if any), resized to size."""
    if box is not None:
        image, mask = cut(image, box), cut(mask, box)
    return resize(image, (size, size), Image.BILINEAR), resize(mask, (size, size), Image.NEAREST)


def cut(array, box):
    """array[top:bottom, left:right], zero-padded where the box leaves the array."""
    top, left, bottom, right = (int(v) for v in box)
    h, w = array.shape[:2]
    if (top, left, bottom, right) == (0, 0, h, w):
        return array
    out = np.zeros((bottom - top, right - left, *array.shape[2:]), array.dtype)
    t, lf, b, r = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    out[t - top : b - top, lf - left : r - left] = array[t:b, lf:r]
    return out


def brain_box(images):
    """--crop brain: one square box (top, left, bottom, right) per patient around the FLAIR channel's
    signal (above a tenth of its maximum, over all slices, as Buda et al. crop), widened to a square
    (the slices stay undistorted; beyond the slice it is zero, the MRI background). The full slice
    where the slices differ in size or no signal is found."""
    shapes = {im.shape[:2] for im in images}
    if len(shapes) != 1:
        return None
    flair = np.stack([im[..., 1] for im in images])
    rows, cols = np.nonzero((flair > 0.1 * flair.max()).any(0)) if flair.max() > 0 else ((), ())
    if not len(rows):
        return None
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    top, left = top - (side - (bottom - top)) // 2, left - (side - (right - left)) // 2
    return (int(top), int(left), int(top + side), int(left + side))


def resize(array, shape, resample):
    """A uint8 image or mask at shape (height, width); the same array if it is that size already."""
    if array.shape[:2] == tuple(shape):
        return array
    return np.array(Image.fromarray(array).resize((shape[1], shape[0]), resample))


def neighbours(slices, k):
    """(N, 2k+1) cache indices: each slice's k neighbours on each side, itself in the middle, within
    its own patient (edge slices repeated). `slices` are in cache order, patient then slice number."""
    n = len(slices)
    patient = np.array([s.patient for s in slices])
    new = np.r_[True, patient[1:] != patient[:-1]]
    first = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    last = np.minimum.accumulate(np.where(np.r_[new[1:], True], np.arange(n), n)[::-1])[::-1]
    offsets = np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :]
    return np.clip(offsets, first[:, None], last[:, None])


class Slices(torch.utils.data.Dataset):
    """A subset of the cached slices (pipeline `cached`, or `device` when the arrays are tensors on
    the training device). The DataLoader fetches a whole batch with one call to `__getitems__`: one
    fancy-indexing read, no per-item Python. With `context` (neighbours() of every cached slice)
    an image is its neighbours' RGB stacked along the channels, read from the same cache."""

    def __init__(self, images, masks, indices, context=None):
        self.images, self.masks, self.indices = images, masks, np.asarray(indices, dtype=np.int64)
        self.on_device = isinstance(images, torch.Tensor)
        self.context = context
        if self.on_device:
            self.device_indices = torch.from_numpy(self.indices).to(images.device)
            if context is not None:
                self.context = torch.from_numpy(context).to(images.device)

    def stack(self, sel):
        """(B, H, W, 3) of the slices at `sel`, or (B, H, W, 3 (2k+1)) with their neighbours."""
        if self.context is None:
            return self.images[sel]
        near = self.images[self.context[sel]]  # (B, 2k+1, H, W, 3)
        b, m, h, w, c = near.shape
        near = near.permute(0, 2, 3, 1, 4) if self.on_device else near.transpose(0, 2, 3, 1, 4)
        return near.reshape(b, h, w, m * c)

    def __len__(self):
        return len(self.indices)

    def __getitems__(self, batch):
        if self.on_device:
            sel = self.device_indices[torch.as_tensor(batch, device=self.images.device)]
            return self.stack(sel), self.masks[sel], sel
        sel = np.sort(self.indices[batch])  # sorted reads are sequential in the memory map
        images = np.ascontiguousarray(self.stack(sel))
        return torch.from_numpy(images), torch.from_numpy(self.masks[sel]), torch.from_numpy(sel)

    def __getitem__(self, i):
        return tuple(t[0] for t in self.__getitems__([i]))


class DecodedSlices(torch.utils.data.Dataset):
    """Pipeline `decode`, the original study's design and the baseline of the speed study: every item
    reads and decodes its two TIFFs (in the DataLoader workers), every epoch."""

    def __init__(self, slices, indices, size, boxes=None):
        self.slices, self.indices, self.size, self.boxes = slices, list(indices), size, boxes

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        k = self.indices[i]
        image, mask = read_pair(self.slices[k], self.size, None if self.boxes is None else self.boxes[k])
        return torch.from_numpy(image), torch.from_numpy(mask), torch.tensor(k)


class TumourShare(torch.utils.data.Sampler):
    """--tumour-share: an epoch is as many draws (with replacement) as there are training slices, a
    share `share` of them from the slices with tumour, the rest from those without; seeded by the
    seed and the epoch, so that every process draws the same and a resumed epoch draws it again."""

    def __init__(self, tumour_pixels, share, seed, flag="--tumour-share"):
        has = np.asarray(tumour_pixels) > 0
        if has.all() or not has.any():
            raise UserError(f"{flag}: the training slices must include slices with and without tumour")
        self.weights = torch.as_tensor(np.where(has, share / has.sum(), (1 - share) / (~has).sum()))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.weights)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.multinomial(self.weights, len(self.weights), True, generator=g).tolist())


def keep_batch(batch):
    """collate_fn: `__getitems__` already returns stacked tensors."""
    return batch


def loaders(
    parts, pipeline, slices, images, masks, size, batch_size, num_workers, pin_memory, device, context=0,
    boxes=None, sampler=None,
):  # fmt: skip
    """A DataLoader per part ("train" shuffled, or drawn by `sampler`), or None for an empty part;
    `context`: --context; `boxes`: the cache's (--crop, for the decode pipeline)."""
    if pipeline == "decode" and slices[0].image is None:
        raise UserError(
            "--data-pipeline decode reads the TIFF files: give --data-dir a kaggle_3m folder, not a pack"
        )
    if (
        pipeline not in WORKERS
    ):  # once, the whole uint8 dataset onto the training device (out of the read-only map)
        images = torch.from_numpy(np.array(images)).to(device)
        masks = torch.from_numpy(np.array(masks)).to(device)
        num_workers, pin_memory = 0, False
    out, near = {}, neighbours(slices, context) if context else None
    for name, idx in parts.items():
        if not idx:
            out[name] = None
            continue
        decoded = pipeline == "decode"
        dataset = DecodedSlices(slices, idx, size, boxes) if decoded else Slices(images, masks, idx, near)
        # a generator of its own: starting an epoch then draws nothing from the global RNG, which the
        # augmentation uses, so a run resumed part-way through an epoch replays the same random stream
        out[name] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=name == "train" and sampler is None,
            sampler=sampler if name == "train" else None,
            num_workers=num_workers,
            collate_fn=None if decoded else keep_batch,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(0),
        )
    return out


def fill_flair(x, stats, pre, post):
    """Slices (B, 3K, H, W) with FLAIR in place of their post-contrast sequence where `post`, and of
    their pre-contrast one too where `pre` (B bools each), their volume statistics (B, 8) with them:
    as the release fills the sequences a patient lacks (post-contrast for 4 of 110, both for 6)."""
    b, c, h, w = x.shape
    x = x.view(b, c // 3, 3, h, w).clone()
    stats = None if stats is None else stats.clone()
    for channel, where in ((0, pre), (2, post)):
        x[:, :, channel] = torch.where(where[:, None, None, None], x[:, :, 1], x[:, :, channel])
        if stats is not None:  # each channel's mean (columns 2-4) and std (5-7): FLAIR's
            for col in (2, 5):
                stats[:, col + channel] = torch.where(where, stats[:, col + 1], stats[:, col + channel])
    return x.view(b, c, h, w), stats


def to_inputs(images, masks, flip=0.0, rotate=0.0, scale=0.0, channels_last=False, stats=None, fill=0.0):
    """uint8 batches (B,H,W,C), (B,H,W) on the device -> normalised float inputs (B,C,H,W) and
    targets (B,1,H,W). With flip/rotate/scale (training only) each slice gets its own random
    flip, rotation and zoom, applied to image and mask by one affine resampling; with `fill`, the
    share of slices given FLAIR for their missing sequences (fill_flair). Normalised per slice and
    channel, or with `stats` (B, 8) (volume_stats; --normalize volume) by its volume's."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    y = masks.unsqueeze(1).float()
    if fill:
        post = torch.rand(x.shape[0], device=x.device) < fill
        x, stats = fill_flair(x, stats, post & (torch.rand(x.shape[0], device=x.device) < 0.5), post)
    if flip or rotate or scale:
        b, dev = x.shape[0], x.device
        angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(rotate)
        zoom = 1 + (torch.rand(b, device=dev) * 2 - 1) * scale
        mirror = torch.where(torch.rand(b, device=dev) < flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zero = torch.zeros_like(cos)
        theta = torch.stack(
            [torch.stack([cos * mirror, -sin, zero], 1), torch.stack([sin * mirror, cos, zero], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", align_corners=False)  # outside: 0, the MRI background
        y = F.grid_sample(y, grid, mode="nearest", align_corners=False)
    if stats is None:  # per-slice, per-channel z-score: scanners differ in scale; nothing stored
        mean, std = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
        x = (x - mean) / (std + 1e-5)
    else:  # the volume's: slices with little brain keep the contrast of their patient's volume
        s = stats.to(x.device, torch.float32)[:, :, None, None]
        k = x.shape[1] // 3  # --context stacks 2K + 1 slices of one patient: its statistics repeat
        x = ((x - s[:, :1]) / (s[:, 1:2] - s[:, :1])).clamp_(0, 1)
        x = (x - s[:, 2:5].repeat(1, k, 1, 1)) / s[:, 5:8].repeat(1, k, 1, 1)
    # one memory format whatever the path (the permute above leaves NHWC strides, the resampling
    # NCHW ones), and convolution speed depends on it
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), y
