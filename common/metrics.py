"""Segmentation metrics from per-slice confusion counts.

Each slice gives (tp, fp, fn, tn) pixel counts of the tumour class (prediction: logit > 0). The
counts are computed on the device, gathered across processes without the padding duplicates, and
pooled over the whole set, so a metric does not depend on batch size or number of processes.
"""
import torch

TP, FP, FN, TN = range(4)


def confusion(logits, target):
    """Per-slice (tp, fp, fn, tn) as an int64 tensor (B, 4), for one-logit outputs (B,1,H,W)."""
    pred, true = logits > 0, target > 0.5
    dims = tuple(range(1, pred.dim()))
    tp = (pred & true).sum(dims)
    fp = (pred & ~true).sum(dims)
    fn = (~pred & true).sum(dims)
    tn = (~pred & ~true).sum(dims)
    return torch.stack([tp, fp, fn, tn], 1).long()


def ratio(num, den):
    """num / den, with 0/0 = 1: both masks empty is a perfect agreement."""
    return 1.0 if den == 0 else num / den


def summarize(counts):
    """Metrics pooled over all slices of `counts` (N, 4).

    iou_tumor, dice: of the tumour class over all pixels of the set.
    miou_bg: mean of background IoU and tumour IoU, background included as in the original study
    (background IoU is ~0.99, so miou_bg ~= 0.5 + iou_tumor / 2): reported as such, never alone.
    """
    tp, fp, fn, tn = (int(v) for v in counts.sum(0).tolist()) if len(counts) else (0, 0, 0, 0)
    iou_tumor = ratio(tp, tp + fp + fn)
    iou_bg = ratio(tn, tn + fn + fp)
    return {"miou_bg": (iou_tumor + iou_bg) / 2, "iou_tumor": iou_tumor, "dice": ratio(2 * tp, 2 * tp + fp + fn)}
