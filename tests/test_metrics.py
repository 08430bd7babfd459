import pytest
import torch

from common.metrics import confusion, summarize


def test_confusion_counts_per_slice():
    target = torch.tensor([[[[1, 1], [0, 0]]], [[[0, 0], [0, 0]]]], dtype=torch.float32)
    logits = torch.tensor([[[[3.0, -1.0], [2.0, -2.0]]], [[[-1.0, -1.0], [-1.0, 5.0]]]])
    # slice 0: tp 1 (top-left), fn 1 (top-right), fp 1 (bottom-left), tn 1; slice 1: fp 1, tn 3
    assert confusion(logits, target).tolist() == [[1, 1, 1, 1], [0, 1, 0, 3]]


def test_summary_pools_pixels_over_the_set():
    counts = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 3]])  # pooled: tp 1, fp 2, fn 1, tn 4
    m = summarize(counts)
    assert m["iou_tumor"] == pytest.approx(1 / 4)
    assert m["dice"] == pytest.approx(2 / 5)
    assert m["miou_bg"] == pytest.approx((1 / 4 + 4 / 7) / 2)  # background IoU: tn / (tn + fp + fn)


def test_empty_masks_and_empty_predictions_agree_perfectly():
    m = summarize(torch.tensor([[0, 0, 0, 10]]))
    assert m == {"miou_bg": 1.0, "iou_tumor": 1.0, "dice": 1.0}


def test_missed_tumour_scores_zero():
    m = summarize(torch.tensor([[0, 0, 5, 5]]))
    assert m["iou_tumor"] == 0 and m["dice"] == 0 and m["miou_bg"] == pytest.approx(0.25)


def test_all_empty_set():
    assert summarize(torch.zeros((0, 4), dtype=torch.long)) == {"miou_bg": 1.0, "iou_tumor": 1.0, "dice": 1.0}
