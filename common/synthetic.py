"""A phantom dataset in the kaggle_3m layout, written as real TIFF files, so that `--synthetic`
runs the exact code path of the real data: head-like ellipses, three channels, a 3-D tumour per
patient that is bright in FLAIR (channel 1), slices at both ends of a volume without tumour, and
bright decoys in the post-contrast channel only, so that a model must look at FLAIR."""

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 1


def smooth_noise(rng, size, cells):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1


def phantom_volume(rng, slices, size):
    """Images (slices, size, size, 3) uint8 and masks (slices, size, size) uint8 in {0, 255}."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size * 2 - 1
    head_a, head_b = rng.uniform(0.7, 0.85), rng.uniform(0.8, 0.92)
    # tumour: an ellipsoid inside the brain, covering the middle part of the volume
    t_center = rng.uniform(-0.35, 0.35, 2)
    t_radius = rng.uniform(0.12, 0.28, 2)
    t_z, t_rz = rng.uniform(0.35, 0.65) * slices, rng.uniform(0.2, 0.35) * slices
    images = np.zeros((slices, size, size, 3), np.float32)
    masks = np.zeros((slices, size, size), np.uint8)
    for k in range(slices):
        z = (k + 0.5) / slices * 2 - 1
        r = np.sqrt(max(1 - z * z, 0.05))  # head cross-section shrinks towards the ends
        head = (xx / (head_a * r)) ** 2 + (yy / (head_b * r)) ** 2
        brain, skull = head < 0.8, (head >= 0.8) & (head < 1)
        texture = smooth_noise(rng, size, 12)
        img = np.zeros((size, size, 3), np.float32)
        img[brain] = (0.40, 0.30, 0.35)
        img[skull] = (0.80, 0.15, 0.60)
        img += 0.05 * texture[..., None] * brain[..., None]
        dz = (k - t_z) / t_rz
        if abs(dz) < 1:
            s = np.sqrt(1 - dz * dz)
            edge = 1 + 0.15 * smooth_noise(rng, size, 6)
            d = ((xx - t_center[0]) / (t_radius[0] * s)) ** 2 + ((yy - t_center[1]) / (t_radius[1] * s)) ** 2
            tumour = (d < edge) & brain
            img[tumour] += (-0.05, 0.45, 0.10)
            masks[k] = tumour * 255
        for _ in range(rng.integers(0, 3)):  # decoys: enhancing spots that are not tumour
            c = rng.uniform(-0.5, 0.5, 2)
            spot = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < rng.uniform(0.002, 0.01)) & brain & (masks[k] == 0)
            img[spot, 2] += 0.45
        images[k] = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), masks


def write_phantoms(root, patients=10, slices=20, size=256, seed=0):
    """Write `patients` phantom volumes under `root` in the kaggle_3m layout."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for p in range(patients):
        name = f"TCGA_SY_{p:04d}_20000101"
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        images, masks = phantom_volume(rng, slices, size)
        for k in range(slices):
            Image.fromarray(images[k]).save(folder / f"{name}_{k + 1}.tif")
            Image.fromarray(masks[k]).save(folder / f"{name}_{k + 1}_mask.tif")
    return root


def phantoms_dir(cache_root, patients=10, slices=20, size=256, seed=0):
    """Where ensure_phantoms keeps the phantom dataset of these parameters."""
    return Path(cache_root) / f"synthetic-v{VERSION}-{patients}x{slices}-{size}px-seed{seed}" / "kaggle_3m"


def ensure_phantoms(cache_root, patients=10, slices=20, size=256, seed=0):
    """The phantom dataset under `cache_root`, written once (to a temporary folder, then renamed)."""
    final = phantoms_dir(cache_root, patients, slices, size, seed)
    if final.is_dir():
        return final
    tmp = final.parent.with_name(f"{final.parent.name}.tmp{os.getpid()}")
    write_phantoms(tmp / "kaggle_3m", patients, slices, size, seed)
    try:
        os.rename(tmp, final.parent)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return final
