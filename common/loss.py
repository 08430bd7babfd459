"""The loss every model trains with: binary cross-entropy and/or a soft Dice pooled over the batch."""

import torch
import torch.nn.functional as F


def loss_terms(logits, target):
    """Per slice (B, 4): mean BCE, and the soft-Dice sums (sum p*t, sum p, sum t)."""
    logits, dims = logits.float(), (1, 2, 3)
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    return torch.stack([bce, (p * target).sum(dims), p.sum(dims), target.sum(dims)], 1)


def loss_from_terms(terms, kind):
    """BCE (mean over slices) and/or soft Dice pooled over all slices of the batch or set: a slice
    without tumour then counts through its false positives, not as a Dice of its own (which would
    be ~1 for any probability mass and drown the signal)."""
    loss = terms.new_zeros(())
    if "bce" in kind:
        loss = loss + terms[:, 0].mean()
    if "dice" in kind:
        inter, p, t = terms[:, 1:].sum(0)
        loss = loss + 1 - (2 * inter + 1) / (p + t + 1)
    return loss
