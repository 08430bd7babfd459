"""The kaggle_3m layout, its decoded cache, the patient split, and batches prepared on the device.

Every TIFF is decoded once into a uint8 cache (images N x S x S x 3, masks N x S x S in {0, 1}, at
--image-size S), keyed by the file list, sizes, modification times, image size and crop; later runs
and every DDP rank memory-map it. Beside them the cache keeps each slice's geometry as released:
its mask at its own size (packed as bits), its size, and the box of it the cached image shows, so
that metrics are counted against the masks as read from disk. A DataLoader batch is one
fancy-indexing read of that cache; normalisation and augmentation then run on the whole batch on the
training device.
"""

import errno
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UserError, no_data
from common.pipelines import WORKERS

CACHE_VERSION = 3
NAME = re.compile(r"^(?P<stem>(?P<patient>.+)_(?P<n>\d+))(?P<mask>_mask)?\.tif$", re.IGNORECASE)


@dataclass(frozen=True)
class Slice:
    patient: str
    n: int
    image: Path
    mask: Path


def discover(data_dir):
    """All image/mask pairs of a kaggle_3m folder, sorted by patient then slice number."""
    data_dir = Path(data_dir)
    hint = "--data-dir (default $LGG_DATA_DIR)"
    if not data_dir.exists():
        raise no_data(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder is not a folder: {data_dir} ({hint})")
    patients = sorted(p for p in data_dir.iterdir() if p.is_dir())
    if not patients:
        raise UserError(f"no patient folders in {data_dir}: expected <patient>/<patient>_<n>.tif ({hint})")
    slices = []
    for folder in patients:
        images, masks = {}, {}
        for f in folder.iterdir():
            if m := NAME.match(f.name):
                (masks if m["mask"] else images)[m["stem"]] = (int(m["n"]), f)
        check_names(folder, [f for _, f in (*images.values(), *masks.values())])
        for stem in sorted(set(images) | set(masks)):
            if stem not in masks:
                raise UserError(f"image without mask: {images[stem][1]} (expected {stem}_mask.tif beside it)")
            if stem not in images:
                raise UserError(f"mask without image: {masks[stem][1]} (expected {stem}.tif beside it)")
            n, image = images[stem]
            slices.append(Slice(folder.name, n, image, masks[stem][1]))
        if len(images) == 1:  # volumes have tens of slices: a lone one is what a half-extracted copy leaves
            raise UserError(f"patient folder {folder} holds a single slice: is the copy complete?")
    if not slices:
        inner = [p / "kaggle_3m" for p in (data_dir, *patients) if (p / "kaggle_3m").is_dir()]
        hint = f" (did you mean --data-dir {inner[0]}?)" if inner else ""
        raise UserError(f"no slices in {data_dir}: patient folders hold no <patient>_<n>.tif files{hint}")
    return sorted(slices, key=lambda s: (s.patient, s.n))


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


def cache_key(slices, data_dir, size, crop="none"):
    items = []
    for s in slices:
        for f in (s.image, s.mask):
            st = f.stat()
            items.append((str(f.relative_to(data_dir)), st.st_size, st.st_mtime_ns))
    blob = json.dumps([CACHE_VERSION, size, crop, items]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@dataclass
class Cache:
    """A data set's decoded arrays (the first three and `native` memory-mapped)."""

    images: np.ndarray  # (N, S, S, 3) uint8: what the network sees
    masks: np.ndarray  # (N, S, S) uint8 {0, 1}, the same geometry
    tumour: np.ndarray  # (N,) tumour pixels of `masks`
    native: np.ndarray  # (N, H, ceil(W / 8)) uint8: each mask as released, packed bits (H, W: the largest)
    shapes: np.ndarray  # (N, 2) each slice's own (height, width)
    boxes: np.ndarray  # (N, 4) top, left, bottom, right: the part of the slice `images` shows
    stats: np.ndarray  # (N, 8) float32: its patient's volume statistics (volume_stats)

    @property
    def native_size(self):
        """(H, W) of the largest slice: the size native masks and predictions are padded to."""
        return tuple(int(v) for v in self.shapes.max(0))

    def native_masks(self, index):
        """The masks as released of the slices at `index`, (B, H, W) bool, zero beyond a slice's size."""
        width = self.native_size[1]
        return np.unpackbits(self.native[np.asarray(index)], axis=-1, count=width).astype(bool)


def open_dataset(data_dir, cache_dir, size, progress=False, crop="none"):
    """(slices, Cache) of a kaggle_3m folder or of a pack file."""
    if Path(data_dir).is_file():
        return load_pack(Path(data_dir), cache_dir, size, progress, crop)
    slices = discover(data_dir)
    return slices, load_cache(slices, data_dir, cache_dir, size, progress, crop)


def load_cache(slices, data_dir, cache_dir, size, progress=False, crop="none"):
    """The Cache of `slices`; built first if absent or stale."""
    tag = "" if crop == "none" else f"-{crop}"
    folder = Path(cache_dir) / f"lgg-{size}px{tag}-{cache_key(slices, data_dir, size, crop)}"
    if (folder / "meta.json").is_file():
        try:
            return open_cache(folder, len(slices), size)
        except (OSError, ValueError):  # arrays damaged after the cache was complete: build it again
            shutil.rmtree(folder, ignore_errors=True)
    build_cache(slices, folder, size, progress, crop)
    return open_cache(folder, len(slices), size)


CACHE_FILES = ("images", "masks", "tumour_pixels", "native_masks", "shapes", "boxes", "volume_stats")


def open_cache(folder, n, size):
    """The cache's arrays, memory-mapped, checked to be whole (a truncated file maps short)."""
    arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in CACHE_FILES]
    expected = [(n, size, size, 3), (n, size, size), (n,), None, (n, 2), (n, 4), (n, 8)]
    if any(e is not None and a.shape != e for a, e in zip(arrays, expected)) or len(arrays[3]) != n:
        raise ValueError(f"{folder}: arrays of another shape")
    return Cache(*arrays)


def reserve(path):
    """The file's blocks allocated now: a full disk is an error here, not a SIGBUS later."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: nothing reserved
                raise


def remove_orphans(cache_dir):
    """Temporary cache folders of processes of this machine that are gone (killed while building)."""
    for tmp in cache_dir.glob(f"lgg-*.tmp-{socket.gethostname()}-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge, or alive


def build_cache(slices, folder, size, progress, crop="none"):
    from rich.progress import track

    natives = (read_native(s) for s in track(slices, f"decoding {len(slices)} slices", disable=not progress))
    write_cache(folder, slices, size, natives, crop)


def prepared(slices, natives, size, crop):
    """(image, mask at size; native mask; box) per slice from its native (image, mask), a patient at a
    time (--crop brain takes one box per patient)."""
    for _, group in itertools.groupby(zip(slices, natives), key=lambda t: t[0].patient):
        pairs = [pair for _, pair in group]
        box = brain_box([image for image, _ in pairs]) if crop == "brain" else None
        for image, mask in pairs:
            b = box or (0, 0, *mask.shape)
            yield *shrink(image, mask, size, b), mask, b


def volume_stats(slices, images):
    """(N, 8) per slice, of its patient's volume as cached: the 10th and 99th percentiles of all its
    intensities (in [0, 1]), then each channel's mean and std once clipped and rescaled between
    them: Buda et al.'s per-volume normalisation (--normalize volume)."""
    out = np.zeros((len(slices), 8), np.float32)
    starts = [0] + [i for i in range(1, len(slices)) if slices[i].patient != slices[i - 1].patient]
    for a, b in zip(starts, starts[1:] + [len(slices)]):
        volume = np.asarray(images[a:b], np.float32) / 255
        # every 8th voxel: within 3 of 255 intensity levels of the whole volume's (22 shared patients)
        lo, hi = np.percentile(volume[::2, ::2, ::2], (10, 99))
        hi = max(hi, lo + 1e-3)
        v = np.clip((volume - lo) / (hi - lo), 0, 1)
        out[a:b] = [lo, hi, *v.mean((0, 1, 2)), *(v.std((0, 1, 2)) + 1e-5)]
    return out


def write_cache(folder, slices, size, natives, crop="none", extra=None):
    """A cache folder of `slices` from their native (image, mask) pairs (and `extra` {file name:
    text}), written to a temporary name and renamed. Its space is checked and reserved first: the
    arrays are memory-mapped, and a page that cannot be backed would kill the process (SIGBUS) with
    no word."""
    n = len(slices)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(folder.parent)
        need, free = n * (size * size * 4 + 2**13) + 2**20, shutil.disk_usage(folder.parent).free
    except OSError as e:
        raise UserError(
            f"cannot use {folder.parent} as the cache folder (--cache-dir): {e.strerror or e}"
        ) from e
    if free < need:
        raise UserError(
            f"not enough space for the decoded data in {folder.parent} (--cache-dir): {need / 2**20:.0f} MiB "
            f"needed, {free / 2**20:.0f} MiB free; point --cache-dir (or $LGG_CACHE_DIR) at a larger disk"
        )
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
        reserve(tmp / "images.npy"), reserve(tmp / "masks.npy")
        native, shapes, boxes = [], np.zeros((n, 2), np.int32), np.zeros((n, 4), np.int32)
        for i, (image, mask, full, box) in enumerate(prepared(slices, natives, size, crop)):
            images[i], masks[i], shapes[i], boxes[i] = image, mask, full.shape, box
            native.append(np.packbits(full, axis=-1))
        images.flush(), masks.flush()
        np.save(tmp / "tumour_pixels.npy", masks.reshape(n, -1).sum(1, dtype=np.int64))
        np.save(tmp / "shapes.npy", shapes), np.save(tmp / "boxes.npy", boxes)
        np.save(tmp / "native_masks.npy", pad_stack(native))
        np.save(tmp / "volume_stats.npy", volume_stats(slices, images))
        del images, masks
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        meta = {"version": CACHE_VERSION, "size": size, "crop": crop, "slices": n}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists() and not (folder / "meta.json").is_file():
            shutil.rmtree(folder)  # a damaged cache (meta.json is written last): replace it
        os.rename(tmp, folder)  # atomic: a reader sees a whole cache or none
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # not just a concurrent build that won the rename
            raise UserError(f"cannot write the cache in {folder.parent} (--cache-dir): {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pad_stack(arrays):
    """Equal-shaped 2-D arrays as one array; different shapes zero-padded to the largest."""
    h, w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    if all(a.shape == (h, w) for a in arrays):
        return np.stack(arrays)
    out = np.zeros((len(arrays), h, w), arrays[0].dtype)
    for o, a in zip(out, arrays):
        o[: a.shape[0], : a.shape[1]] = a
    return out


def split(slices, how, val_frac, test_frac, seed, tumour_pixels=None, folds=0, fold=0, test_fold=None):
    """Indices of the train/val/test slices. By patient (default): no patient on two sides; the
    same seed gives the same split on every rank and machine (Python's seeded shuffle).

    With folds > 1, the test set is held out first, as without folds; the other patients are dealt
    into `folds` folds (deal), so each fold gets a similar share of tumour; fold `fold` validates,
    the rest train. With `test_fold` (outer cross-validation) every patient is dealt, none held out
    first: that fold is the test set, and `val_frac` of all patients, from the others, validate.
    val_frac 0: no validation patients (the run keeps its last epoch)."""
    keys = sorted({s.patient for s in slices}) if how == "patient" else list(range(len(slices)))
    key_of = (lambda i: slices[i].patient) if how == "patient" else (lambda i: i)
    unit = "patients" if how == "patient" else "slices"
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(test_frac * len(keys))) if test_frac > 0 and test_fold is None else 0
    test, rest = keys[:n_test], keys[n_test:]
    n_val = max(1, round(val_frac * len(keys))) if val_frac > 0 else 0
    if test_fold is not None:
        test = deal(rest, slices, key_of, tumour_pixels, folds, test_fold, unit, "patients in all")
        tested = set(test)
        rest = [k for k in rest if k not in tested]
        val = rest[:n_val]
    elif folds > 1:
        val = deal(rest, slices, key_of, tumour_pixels, folds, fold, unit, "outside the test set")
    else:
        val = rest[:n_val]
    in_val = set(val)
    train = [k for k in rest if k not in in_val]
    if not train:
        raise UserError(f"--val-frac/--test-frac: {len(keys)} {unit} leave none to train on")
    side = {k: name for name, ks in (("test", test), ("val", val), ("train", train)) for k in ks}
    out = {name: [] for name in ("train", "val", "test")}
    for i in range(len(slices)):
        out[side[key_of(i)]].append(i)
    return out


def deal(keys, slices, key_of, tumour_pixels, folds, fold, unit, where):
    """Fold `fold` of `keys` dealt into `folds` by their number of tumour slices (largest first, in
    turn forwards and backwards): each fold gets a similar share of tumour."""
    if folds > len(keys):
        raise UserError(f"--folds {folds}: only {len(keys)} {unit} {where}")
    tumour = {k: 0 for k in keys}
    for i in range(len(slices)):
        if key_of(i) in tumour and tumour_pixels[i] > 0:
            tumour[key_of(i)] += 1
    ranked = sorted(keys, key=lambda k: -tumour[k])  # stable: ties keep the seeded order
    turn = [j % folds if (j // folds) % 2 == 0 else folds - 1 - j % folds for j in range(len(ranked))]
    return [k for k, t in zip(ranked, turn) if t == fold]


SPLIT_FLAGS = ("split", "seed", "val_frac", "test_frac", "folds", "fold", "test_fold")


def split_key(kind):
    """How split.json names a slice's unit: its patient, or with --split slice "<patient>_<number>"."""
    return (lambda s: s.patient) if kind == "patient" else (lambda s: f"{s.patient}_{s.n}")


def split_from_record(slices, record, allow_missing=False):
    """The split a run recorded in its split.json, on the slices found now: the record is the truth
    for everything that uses the run. Returns (parts, notes); data that no longer match the record
    are a UserError, or with allow_missing a note (and evaluated on what is left)."""
    key = split_key(record["split"])
    side = {k: name for name in ("train", "val", "test") for k in record[name]}
    parts = {name: [] for name in ("train", "val", "test")}
    for i, s in enumerate(slices):
        if key(s) in side:
            parts[side[key(s)]].append(i)
    unit = "patients" if record["split"] == "patient" else "slices"
    missing = sorted(set(side) - {key(s) for s in slices})
    changed = [f"{name} has {len(parts[name])} slices, split.json {record[name + '_slices']}"
               for name in parts if len(parts[name]) != record[name + "_slices"]]  # fmt: skip
    notes = []
    if missing:
        notes.append(f"{len(missing)} {unit} of split.json are not in the data ({', '.join(missing[:3])}"
                     + (", ..." if len(missing) > 3 else "") + ")")  # fmt: skip
    elif changed:
        notes.append("; ".join(changed))
    if notes and not allow_missing:
        raise UserError(f"the data no longer match the run's split.json: {notes[0]}; restore them, or pass "
                        "--allow-missing to use what is left")  # fmt: skip
    extra = len({key(s) for s in slices} - set(side))
    if extra:
        notes.append(f"{extra} {unit} in the data are not in split.json: left out")
    return parts, notes


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

    def __init__(self, tumour_pixels, share, seed):
        has = np.asarray(tumour_pixels) > 0
        if has.all() or not has.any():
            raise UserError("--tumour-share: the training slices must include slices with and without tumour")
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


def to_inputs(images, masks, flip=0.0, rotate=0.0, scale=0.0, channels_last=False, stats=None):
    """uint8 batches (B,H,W,C), (B,H,W) on the device -> normalised float inputs (B,C,H,W) and
    targets (B,1,H,W). With flip/rotate/scale (training only) each slice gets its own random
    flip, rotation and zoom, applied to image and mask by one affine resampling. Normalised per
    slice and channel, or with `stats` (B, 8) (volume_stats; --normalize volume) by its volume's."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    y = masks.unsqueeze(1).float()
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


# Packs: the decoded cache as a portable file, to stage data onto compute nodes. `F` is a small JSON
# manifest (slices, image size, each part's size and sha256); the data are one compressed .npz
# (lossless: the uint8 arrays themselves) cut into parts F.part1, F.part2, ... of at most --part-size.
PACK_FORMAT = "lgg-seg pack 1"


def pack(data_dir, out, cache_dir, size=256, part_size=0, progress=True):
    """Write the pack of a kaggle_3m folder; returns the paths written (manifest first)."""
    import io

    slices, cache = open_dataset(data_dir, cache_dir, size, progress)
    index = json.dumps([[s.patient, s.n] for s in slices])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=cache.images, masks=cache.masks, index=np.array(index))
    blob = buffer.getbuffer()
    step = part_size or len(blob)
    chunks = [blob[k : k + step] for k in range(0, len(blob), step)]
    out = Path(out)
    parts = [out.with_name(f"{out.name}.part{k + 1}") for k in range(len(chunks))]
    for path, chunk in zip(parts, chunks):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(chunk)
        tmp.replace(path)
    manifest = {
        "format": PACK_FORMAT,
        "image_size": size,
        "slices": len(slices),
        "patients": len({s.patient for s in slices}),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parts": [
            {"name": p.name, "bytes": len(c), "sha256": hashlib.sha256(c).hexdigest()}
            for p, c in zip(parts, chunks)
        ],
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out)
    return [out, *parts]


def pack_manifest(path):
    try:
        manifest = json.loads(path.read_text()) if path.stat().st_size < 1 << 20 else {}
    except (ValueError, UnicodeDecodeError):
        manifest = {}
    if manifest.get("format") != PACK_FORMAT:
        raise UserError(
            f"--data-dir {path}: a file, but not a pack manifest of this repository "
            "(give the kaggle_3m folder, or the manifest that `python -m common.data pack` wrote)"
        )
    return manifest


def read_pack(path, manifest):
    """The .npz bytes of a pack, checked part by part; a missing, truncated or altered part is a UserError."""
    blob = bytearray()
    for part in manifest["parts"]:
        f = path.with_name(part["name"])
        if not f.is_file():
            raise UserError(f"--data-dir {path}: part {f} is missing")
        chunk = f.read_bytes()
        if len(chunk) != part["bytes"] or hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise UserError(
                f"--data-dir {path}: part {f} is damaged ({len(chunk)} bytes, expected {part['bytes']}, "
                "or another checksum): copy it again"
            )
        blob += chunk
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise UserError(
            f"--data-dir {path}: the parts do not add up to the packed data (checksum): copy them again"
        )
    return bytes(blob)


def load_pack(path, cache_dir, size, progress=False, crop="none"):
    """A pack's slices and Cache, through the cache (unpacked there once, keyed by its checksum). The
    pack's slices are the native ones (a pack at 256 px, the default, holds kaggle_3m losslessly)."""
    import io

    manifest = pack_manifest(path)
    tag = "" if crop == "none" else f"-{crop}"
    folder = Path(cache_dir) / f"lgg-{size}px{tag}-pack-{manifest['sha256'][:20]}"
    if not (folder / "meta.json").is_file():
        with np.load(io.BytesIO(read_pack(path, manifest))) as z:
            images, masks, index = z["images"], z["masks"], str(z["index"])
        slices = [Slice(patient, n, None, None) for patient, n in json.loads(index)]
        write_cache(folder, slices, size, zip(images, masks), crop, {"index.json": index})
    slices = [Slice(patient, n, None, None) for patient, n in json.loads((folder / "index.json").read_text())]
    return slices, open_cache(folder, len(slices), size)


def counts(slices, cache):
    patients, with_tumour = len({s.patient for s in slices}), int((np.asarray(cache.tumour) > 0).sum())
    return f"{patients} patients, {len(slices)} slices, {with_tumour} with tumour"


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m common.data",
        description="Pack the decoded data set into a "
        "portable file (to stage it onto compute nodes), or unpack one into the cache.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="write a pack: manifest OUT and parts OUT.part1, ...")
    a.add_argument("--data-dir", type=Path, required=True, help="a kaggle_3m folder")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--part-size", type=float, default=0, help="MiB per part at most (0: one part)")
    a.add_argument("--image-size", type=int, default=256, help="256: the slices as released, losslessly")
    b = sub.add_parser("unpack", help="check a pack and unpack it into the cache, where runs find it")
    b.add_argument("pack", type=Path)
    b.add_argument("--image-size", type=int, default=256)
    for s in (a, b):
        s.add_argument(
            "--cache-dir",
            type=Path,
            default=Path(os.environ.get("LGG_CACHE_DIR", Path.home() / ".cache" / "lgg-seg")),
        )
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            written = pack(
                args.data_dir, args.out, args.cache_dir, args.image_size, int(args.part_size * 2**20)
            )
            print("wrote " + ", ".join(f"{w} ({w.stat().st_size / 2**20:.1f} MiB)" for w in written))
            print(counts(*open_dataset(args.data_dir, args.cache_dir, args.image_size)))
        else:
            slices, cache = load_pack(args.pack, args.cache_dir, args.image_size, progress=True)
            print(f"unpacked into {args.cache_dir}: {counts(slices, cache)}")
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
