"""Segmentation metrics from per-slice confusion counts (and, for 3-D ones, the predicted masks).

Every metric is counted at native resolution: the network's logits are resized back (bilinear) to
each slice's own size and place (native_logits), thresholded there, and compared with the mask as
released, whatever --image-size the network ran at. Each slice gives (tp, fp, fn, tn) pixel counts
of the tumour class (prediction: logit > 0). The counts are computed on the device, gathered
across processes without the padding duplicates, and pooled over the whole set, so no metric
depends on batch size or number of processes.
An empty mask with an empty prediction is a perfect agreement (1.0); a metric with nothing to
average over (say, slice Dice on a set without tumour) is None.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

TP, FP, FN, TN = range(4)


@dataclass(frozen=True)
class Metric:
    key: str  # in summary.json, eval.json and metrics.jsonl (val_<key>)
    title: str  # in tables and CSV headers
    short: str  # in the console table, which must fit 80 columns
    fmt: str = "{:.4f}"
    higher_is_better: bool = True
    console: bool = True  # shown in the run's final console table


# every metric a run reports, in the order tables show them; the README defines each
METRICS = [
    Metric("miou_bg", "mIoU+bg", "mIoU+bg"),
    Metric("miou_bg_seed", "mIoU+bg per batch", "orig."),
    Metric("iou_tumor", "IoU", "IoU"),
    Metric("dice", "Dice", "Dice"),
    Metric("dice_slice", "Dice/slice", "slice"),
    Metric("empty_fp_rate", "empty FP", "emptyFP", higher_is_better=False, console=False),
    Metric("dice_patient_mean", "Dice/patient mean", "patient"),
    Metric("dice_patient_median", "median", "median", console=False),
    Metric("dice_patient_lcc_mean", "+LCC mean", "+LCC", console=False),
    Metric("dice_patient_post_mean", "post-processed mean", "post", console=False),
    Metric("hd95_patient_mean", "HD95 px", "HD95", higher_is_better=False),
    Metric("hd95_excluded", "HD95 excl.", "excl.", "{}", higher_is_better=False, console=False),
]


SCORED_AT = "native"  # how summary.json, eval.json and the tables name the resolution of the metrics


def native_logits(logits, shapes, boxes, size):
    """Logits (B, 1, S, S) at each slice's own geometry: (B, H, W), H x W = `size` (the largest
    slice). Each slice's logits are resized (bilinear) to its box (the part of the slice the network
    saw) and put there; outside the box and beyond the slice's own size they are -inf (background)."""
    logits, (h, w) = logits.float(), size
    full = [tuple(b) == (0, 0, *s) == (0, 0, h, w) for s, b in zip(shapes.tolist(), boxes.tolist())]
    if all(full):  # the common case (no crop, one slice size): one resize for the batch
        same = logits.shape[-2:] == (h, w)
        return (logits if same else F.interpolate(logits, (h, w), mode="bilinear", align_corners=False))[:, 0]
    out = logits.new_full((len(logits), h, w), -torch.inf)
    for i, ((sh, sw), (top, left, bottom, right)) in enumerate(zip(shapes.tolist(), boxes.tolist())):
        box = F.interpolate(
            logits[i : i + 1], (bottom - top, right - left), mode="bilinear", align_corners=False
        )
        t, lf, b, r = max(top, 0), max(left, 0), min(bottom, sh), min(right, sw)
        out[i, t:b, lf:r] = box[0, 0, t - top : b - top, lf - left : r - left]
    return out


def confusion(logits, target, areas=None):
    """Per-slice (tp, fp, fn, tn) as an int64 tensor (B, 4), for logits and targets of one shape
    ((B, 1, H, W) or (B, H, W)); `areas` (B,): each slice's own pixel count, where slices are
    zero-padded to a common size (the padding is no true negative)."""
    pred, true = logits > 0, target > 0.5
    dims = tuple(range(1, pred.dim()))
    tp = (pred & true).sum(dims)
    fp = (pred & ~true).sum(dims)
    fn = (~pred & true).sum(dims)
    tn = (~pred & ~true).sum(dims) if areas is None else areas.to(tp.device) - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], 1).long()


def ratio(num, den):
    """num / den, with 0/0 = 1: both masks empty is a perfect agreement."""
    return 1.0 if den == 0 else num / den


def mean(values):
    return float(np.mean(values)) if len(values) else None


def median(values):
    return float(np.median(values)) if len(values) else None


def pooled(c):
    """miou_bg, iou_tumor, dice of one (tp, fp, fn, tn) sum."""
    tp, fp, fn, tn = (int(v) for v in c)
    iou_tumor, iou_bg = ratio(tp, tp + fp + fn), ratio(tn, tn + fn + fp)
    return {
        "miou_bg": (iou_tumor + iou_bg) / 2,
        "iou_tumor": iou_tumor,
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
    }


def miou_bg_seed(counts, batch=4, seed=233):
    """The original study's protocol, for comparison only: slices shuffled into batches of 4, a
    confusion matrix per batch, background and tumour IoU averaged per batch (a batch with no
    tumour in truth or prediction scores 0.5), then averaged over batches."""
    order = list(range(len(counts)))
    random.Random(seed).shuffle(order)
    scores = []
    for k in range(0, len(order), batch):
        tp, fp, fn, tn = counts[order[k : k + batch]].sum(0).tolist()
        scores.append(0.5 if tp + fp + fn == 0 else (tp / (tp + fp + fn) + ratio(tn, tn + fp + fn)) / 2)
    return mean(scores)


def summarize(counts, patients=None):
    """Metrics of a set from its per-slice counts (N, 4).

    miou_bg, iou_tumor, dice: pooled over all pixels of the set (miou_bg averages background IoU,
      ~0.99, in: miou_bg ~= 0.5 + iou_tumor / 2, so it is never reported alone).
    miou_bg_seed: the original's per-batch protocol on the same predictions.
    dice_slice: mean Dice over the slices that have tumour; empty_fp_rate: share of tumour-free
      slices where anything is predicted.
    dice_patient_mean/median: Dice of each patient's volume (patients: a name per slice).
    """
    counts = counts.long().cpu() if len(counts) else torch.zeros((0, 4), dtype=torch.long)
    out = pooled(counts.sum(0))
    out["miou_bg_seed"] = miou_bg_seed(counts)
    tp, fp, fn = counts[:, TP], counts[:, FP], counts[:, FN]
    tumour = (tp + fn) > 0
    out["dice_slice"] = mean((2 * tp / (2 * tp + fp + fn))[tumour].tolist())
    out["empty_fp_rate"] = mean(((tp + fp) > 0)[~tumour].float().tolist())
    if patients is not None:
        per = {}
        for p, c in zip(patients, counts):
            per[p] = per.get(p, 0) + c
        dices = [pooled(c)["dice"] for c in per.values()]
        out["dice_patient_mean"], out["dice_patient_median"] = mean(dices), median(dices)
    return out


def largest_component(volume):
    """The largest 3-D connected component (6-connectivity) of a boolean volume."""
    labels, n = ndimage.label(volume)
    if n <= 1:
        return volume
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (np.argmax(sizes) + 1)


# post-processings of a predicted volume, chosen on validation patients (--postprocess auto): as
# predicted, the largest 3-D component, or components of fewer than N voxels dropped
POSTPROCESS = ("none", "lcc", "min8", "min32", "min128")


def postprocessed(volume):
    """{name: volume} for each of POSTPROCESS, from one labelling (6-connectivity)."""
    labels, n = ndimage.label(volume)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out = {"none": volume, "lcc": largest_component(volume) if n > 1 else volume}
    for name in POSTPROCESS[2:]:
        keep = sizes >= int(name[3:])
        keep[0] = False
        out[name] = keep[labels]
    return out


def dice_key(name):
    """The per-patient row's Dice after post-processing `name`."""
    return {"none": "dice", "lcc": "dice_lcc"}.get(name, f"dice_{name}")


def choose_postprocess(rows):
    """The post-processing of best mean per-patient Dice over `rows` (validation patients); ties go to
    the simpler one (POSTPROCESS's order)."""
    means = {name: np.mean([r[dice_key(name)] for r in rows]) for name in POSTPROCESS}
    return max(POSTPROCESS, key=lambda name: (round(float(means[name]), 12), -POSTPROCESS.index(name)))


def with_postprocess(result, name):
    """`result` (an evaluation with per-patient rows) with post-processing `name`'s summary."""
    dice = [r[dice_key(name)] for r in result["per_patient"]]
    return {
        **result,
        "postprocess": name,
        "dice_patient_post_mean": mean(dice),
        "dice_patient_post_median": median(dice),
    }


def hd95(pred, truth):
    """95th-percentile Hausdorff distance between the surfaces of two non-empty boolean volumes, in
    voxels (in-plane pixels, slice spacing counted as 1): the larger of the two directed 95th
    percentiles, as MONAI computes it."""

    def surface(v):
        return v & ~ndimage.binary_erosion(v)

    # within the box around both (one voxel of background more where there is room) the surfaces
    # and every distance between them are the same as in the whole volume, for a fraction of the cost
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    sp, st = surface(pred[box]), surface(truth[box])
    d_to_truth = ndimage.distance_transform_edt(~st)[sp]
    d_to_pred = ndimage.distance_transform_edt(~sp)[st]
    return float(max(np.percentile(d_to_truth, 95), np.percentile(d_to_pred, 95)))


def patient_row(pred, truth, area=None):
    """One patient's 3-D metrics, from its predicted and true masks (slices, H, W) bool: Dice and
    tumour IoU of the volume and HD95 (None when the truth or the prediction is empty), as predicted
    and after keeping the largest connected component of the prediction (the dataset author's
    post-processing)."""
    row = {
        "slices": len(truth),
        "tumour_slices": int(truth.any((1, 2)).sum()),
        "tumour_voxels": int(truth.sum()),
        "tp": int((pred & truth).sum()),
        "fp": int((pred & ~truth).sum()),
        "fn": int((~pred & truth).sum()),
    }
    row["tn"] = int((~pred & ~truth).sum()) if area is None else int(area) - row["tp"] - row["fp"] - row["fn"]
    variants = postprocessed(pred)
    for tag, p in (("", pred), ("_lcc", variants["lcc"])):
        inter, total = int((p & truth).sum()), int(p.sum() + truth.sum())
        row[f"dice{tag}"] = ratio(2 * inter, total)
        row[f"iou{tag}"] = ratio(inter, total - inter)
        row[f"hd95{tag}"] = hd95(p, truth) if p.any() and truth.any() else None
    for name in POSTPROCESS[2:]:
        p = variants[name]
        row[dice_key(name)] = ratio(2 * int((p & truth).sum()), int(p.sum() + truth.sum()))
    return row


def volume_metrics(pred, truth, patients, areas=None):
    """Per-patient 3-D metrics from predicted and true masks (N, H, W) bool, slices of a patient in
    order: a row per patient (patient_row) in `per_patient`, and their summaries. hd95_patient is
    over patients whose prediction and truth are both non-empty; the others are counted apart
    (hd95_excluded), not averaged in. `areas` (N,): each slice's own pixel count, where slices of
    different sizes are zero-padded to one."""
    names = list(dict.fromkeys(patients))
    patients = np.asarray(patients)
    area = (lambda sel: None) if areas is None else (lambda sel: np.asarray(areas)[sel].sum())
    rows = []
    for name in names:
        sel = patients == name
        rows.append({"patient": name, **patient_row(pred[sel], truth[sel], area(sel))})
    lcc = [r["dice_lcc"] for r in rows]
    hd = [r["hd95"] for r in rows if r["hd95"] is not None]
    return {
        "dice_patient_lcc_mean": mean(lcc),
        "dice_patient_lcc_median": median(lcc),
        "hd95_patient_mean": mean(hd),
        "hd95_patient_median": median(hd),
        "hd95_patients": len(hd),
        "hd95_excluded": len(rows) - len(hd),
        "per_patient": rows,
    }
