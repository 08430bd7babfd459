"""The decoded cache: every TIFF decoded once into uint8 arrays (images N x S x S x 3, masks
N x S x S in {0, 1}, at --image-size S), keyed by the file list, sizes, modification times, image
size and crop; later runs and every DDP rank memory-map it. Beside them it keeps each slice's
geometry as released: its mask at its own size (packed as bits), its size, and the box of it the
cached image shows, so that metrics are counted against the masks as read from disk.
"""

import errno
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import report
from common.data import Slice, brain_box, discover, read_native, shrink
from common.errors import UserError
from common.pack import pack_manifest, read_pack

CACHE_VERSION = 3


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
    source = json.dumps({"data_dir": str(Path(data_dir).resolve())})

    def build():
        build_cache(slices, folder, size, progress, crop, {"source.json": source})
        if progress:  # the main process, once the new cache is in place
            remove_superseded(folder, source)

    return opened(folder, build, lambda: open_cache(folder, size))


def opened(folder, build, read):
    """`read()` of the cache in `folder`, built first (`build()`) if absent, or again if it was
    damaged after it was complete (a truncated array, a garbled meta.json or index)."""
    try:
        return read()
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        if (folder / "meta.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
    build()
    return read()


def remove_superseded(folder, source):
    """The caches of the same data folder, size and crop that this one replaces (its files changed
    or were copied anew: an old cache would never be read again), removed and said."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for old in folder.parent.glob(f"{prefix}*"):
        same = (
            old != folder and (old / "source.json").is_file() and (old / "source.json").read_text() == source
        )
        if same and len(old.name) == len(folder.name):  # a cache folder, not a temporary one
            mib = sum(f.stat().st_size for f in old.iterdir()) / 2**20
            shutil.rmtree(old, ignore_errors=True)
            said = "the cache of this data folder before its files changed"
            report.console.print(f"note: removed {old} ({mib:.0f} MiB): {said}")


CACHE_FILES = ("images", "masks", "tumour_pixels", "native_masks", "shapes", "boxes", "volume_stats")


def open_cache(folder, size):
    """The cache's arrays, memory-mapped, checked to be whole (a truncated file maps short)."""
    n = json.loads((folder / "meta.json").read_text())["slices"]
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


def build_cache(slices, folder, size, progress, crop="none", extra=None):
    from rich.progress import track

    natives = (read_native(s) for s in track(slices, f"decoding {len(slices)} slices", disable=not progress))
    write_cache(folder, slices, size, natives, crop, extra)


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


def load_pack(path, cache_dir, size, progress=False, crop="none"):
    """A pack's slices and Cache, through the cache (unpacked there once, keyed by its checksum). The
    pack's slices are the native ones (a pack at 256 px, the default, holds kaggle_3m losslessly)."""
    manifest = pack_manifest(path)
    if manifest.get("image_size", 0) < size:
        raise UserError(
            f"--data-dir {path}: packed at {manifest.get('image_size')} px, below --image-size {size} (its "
            "slices would be upsampled): pack at 256 px, the default, or train at that size"
        )
    tag = "" if crop == "none" else f"-{crop}"
    folder = Path(cache_dir) / f"lgg-{size}px{tag}-pack-{manifest['sha256'][:20]}"

    def build():
        with np.load(io.BytesIO(read_pack(path, manifest))) as z:
            images, masks, index = z["images"], z["masks"], str(z["index"])
        slices = [Slice(patient, n, None, None) for patient, n in json.loads(index)]
        write_cache(folder, slices, size, zip(images, masks), crop, {"index.json": index})

    def read():
        index, cache = json.loads((folder / "index.json").read_text()), open_cache(folder, size)
        if len(index) != len(cache.images):
            raise ValueError(f"{folder}: an index of another length")
        return [Slice(patient, n, None, None) for patient, n in index], cache

    return opened(folder, build, read)
