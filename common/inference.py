"""Networks applied to slices as they were trained (their size, crop, neighbours, normalisation),
ensembles and test-time mirroring as one network (Averaged), their masks at each slice's own size,
and figures of those masks: what evaluation, tools.predict, tools.export and the figures share."""

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from common import data, files, metrics, registry
from common.cache import prepared, volume_stats
from common.checkpoint import load_checkpoint


class Averaged(nn.Module):
    """Several networks (an ensemble) and/or each slice with its mirror image (test-time
    augmentation) as one network: the logit of their mean probability, so that what follows (the
    threshold at 0, the loss, the metrics) stays as it is for one network."""

    def __init__(self, models, mirror=False):
        super().__init__()
        self.models, self.mirror = nn.ModuleList(models), mirror

    def forward(self, x):
        probs = []
        for model in self.models:
            probs.append(torch.sigmoid(model(x).float()))
            if self.mirror:  # left-right: the training flips do the same, and brains are near-symmetric
                probs.append(torch.sigmoid(model(x.flip(-1)).float()).flip(-1))
        return torch.logit(torch.stack(probs).mean(0), eps=1e-6)


TRUTH, PRED = "#2ca02c", "#d62728"


def load_model(path, device="cpu"):
    ckpt = load_checkpoint(path)
    model = registry.build(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


@torch.inference_mode()
def predict(model, images, device, patients=None, context=0, batch_size=16, stats=None):
    """Logits (N, 1, S, S) for uint8 images (N, S, S, 3) of `patients` (in slice order), each with
    its --context neighbours and normalised as the network was trained (`stats`: volume_stats)."""
    patients = range(len(images)) if patients is None else patients  # unknown: each slice alone
    near = data.neighbours([SimpleNamespace(patient=p) for p in patients], context) if context else None
    slices = data.Slices(images, np.zeros(images.shape[:3], np.uint8), np.arange(len(images)), near)
    out = []
    for k in range(0, len(images), batch_size):
        at = list(range(k, min(k + batch_size, len(images))))
        x, y, _ = slices.__getitems__(at)
        norm = None if stats is None else torch.from_numpy(stats[at])
        x, _ = data.to_inputs(x.to(device), y.to(device), stats=norm)
        out.append(model(x).float().cpu())
    return torch.cat(out)


def predict_native(model, config, images, patients, device):
    """Boolean masks at each slice's own size for native uint8 images (a list of (H, W, 3)) of
    `patients` (in slice order): preprocessed as the network was trained (--crop, --normalize), its
    logits resized back (bilinear) and thresholded, as the metrics score them."""
    size = config["image_size"]
    fake = [SimpleNamespace(patient=p) for p in patients]
    blank = [np.zeros(im.shape[:2], np.uint8) for im in images]
    shrunk, _, _, boxes = zip(*prepared(fake, zip(images, blank), size, config.get("crop", "none")))
    stack = np.stack(shrunk)
    stats = volume_stats(fake, stack) if config.get("normalize", "slice") == "volume" else None
    logits = predict(model, stack, device, patients, config.get("context", 0), stats=stats)
    return at_native(logits, np.array([im.shape[:2] for im in images]), np.array(boxes))


def native_masks(model, config, cache, index, patients):
    """Boolean masks at each slice's own size for the cache's slices at `index` (numbered as
    `patients`, in slice order), fed as the network was trained (--context, --normalize; a cache
    made with its --crop)."""
    at = np.asarray(index)
    stats = np.asarray(cache.stats)[at] if config.get("normalize", "slice") == "volume" else None
    logits = predict(
        model, np.asarray(cache.images[at]), "cpu", patients, config.get("context", 0), stats=stats
    )
    return at_native(logits, cache.shapes[at], cache.boxes[at])


def at_native(logits, shapes, boxes):
    """Logits at the network's size, resized back (bilinear) into each slice's box at its own size
    (`shapes`) and thresholded, as the metrics score them."""
    out = []
    for i in range(len(logits)):  # one at a time: slices may differ in size
        native = metrics.native_logits(
            logits[i : i + 1], shapes[i : i + 1], boxes[i : i + 1], tuple(shapes[i])
        )
        out.append((native[0] > 0).numpy())
    return out


def at_size(image, shape):
    """A 2-D uint8 image resized (bilinear) to `shape` (H, W); as it is if it has that size."""
    if image.shape == tuple(shape):
        return np.asarray(image)
    return np.asarray(Image.fromarray(np.asarray(image)).resize(tuple(shape)[::-1], Image.BILINEAR))


def dice(pred, truth):
    den = pred.sum() + truth.sum()
    return 1.0 if den == 0 else 2 * (pred & truth).sum() / den


def overlay(ax, flair, truth, pred):
    ax.imshow(flair, cmap="gray")
    if truth is not None and truth.any():
        ax.contour(truth, levels=[0.5], colors=TRUTH, linewidths=1)
    if pred.any():
        ax.contour(pred, levels=[0.5], colors=PRED, linewidths=1)
    ax.axis("off")


def slice_figure(path, name, flair, truth, pred):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    panels = [
        (flair, "FLAIR"),
        (truth if truth is not None else np.zeros_like(pred), "true mask"),
        (pred, "prediction"),
    ]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    overlay(axes[3], flair, truth, pred)
    axes[3].set_title("overlay" + (f" (Dice {dice(pred, truth):.2f})" if truth is not None else ""))
    fig.suptitle(name, fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=80)
    plt.close(fig)


def choose(truths, flairs):
    """Indices of a large tumour, a small one and an empty slice (first, middle, last without masks)."""
    n = len(flairs)
    if any(t is None for t in truths):
        return sorted({0, n // 2, n - 1})
    area = np.array([t.sum() for t in truths])
    tumour = np.flatnonzero(area > 0)
    picks = []
    if len(tumour):
        picks.append(int(tumour[np.argmax(area[tumour])]))
        by_size = tumour[np.argsort(area[tumour])]
        picks.append(int(by_size[len(by_size) // 10]))  # small, but not the tiniest sliver
    empty = np.flatnonzero(area == 0)
    if len(empty):
        picks.append(int(empty[np.argmax([flairs[i].mean() for i in empty])]))  # most brain in view
    return list(dict.fromkeys(picks))


def comparison_figure(path, names, flairs, truths, preds, labels, picks):
    import matplotlib.pyplot as plt

    rows = 1 + len(labels)
    fig, axes = plt.subplots(rows, len(picks), figsize=(3.2 * len(picks), 3.2 * rows), squeeze=False)
    for c, i in enumerate(picks):
        overlay(axes[0, c], flairs[i], truths[i], np.zeros_like(flairs[i], dtype=bool))
        axes[0, c].set_title(f"{names[i]}\ntruth", fontsize=8)
        for r, label in enumerate(labels, start=1):
            overlay(axes[r, c], flairs[i], truths[i], preds[label][i])
            score = f" Dice {dice(preds[label][i], truths[i]):.2f}" if truths[i] is not None else ""
            axes[r, c].set_title(f"{label}{score}", fontsize=9)
    fig.suptitle("truth green, prediction red", fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=90)
    plt.close(fig)
