import numpy as np
import pytest
import torch

from common.metrics import confusion, hd95, largest_component, summarize, volume_metrics


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
    assert (m["miou_bg"], m["iou_tumor"], m["dice"], m["empty_fp_rate"]) == (1.0, 1.0, 1.0, 0.0)


def test_missed_tumour_scores_zero():
    m = summarize(torch.tensor([[0, 0, 5, 5]]))
    assert m["iou_tumor"] == 0 and m["dice"] == 0 and m["miou_bg"] == pytest.approx(0.25)


def test_all_empty_set():
    m = summarize(torch.zeros((0, 4), dtype=torch.long), patients=[])
    assert (m["miou_bg"], m["iou_tumor"], m["dice"]) == (1.0, 1.0, 1.0)
    assert m["miou_bg_seed"] is m["dice_slice"] is m["empty_fp_rate"] is m["dice_patient_mean"] is None


def test_original_protocol_scores_empty_batches_half():
    empty = torch.tensor([[0, 0, 0, 10]] * 8)  # 2 batches without tumour anywhere
    assert summarize(empty)["miou_bg_seed"] == 0.5 and summarize(empty)["miou_bg"] == 1.0
    same = torch.tensor([[1, 0, 0, 3]] * 8)
    assert summarize(same)["miou_bg_seed"] == 1.0


def test_original_protocol_averages_per_batch():
    # whichever order: every batch of 4 holds the same mix, so each batch's mIoU is the pooled one
    counts = torch.tensor([[2, 2, 0, 4]] * 8)
    m = summarize(counts)
    assert m["miou_bg_seed"] == pytest.approx(m["miou_bg"]) == pytest.approx((2 / 4 + 4 / 6) / 2)


def test_slice_dice_and_false_positives_on_empty_slices():
    counts = torch.tensor([[2, 0, 0, 2], [1, 1, 0, 2], [0, 0, 0, 4], [0, 1, 0, 3]])
    m = summarize(counts)
    assert m["dice_slice"] == pytest.approx((1 + 2 / 3) / 2)  # slices 0 and 1 have tumour
    assert m["empty_fp_rate"] == 0.5  # of slices 2 and 3, slice 3 has a prediction


def test_per_patient_dice():
    counts = torch.tensor([[2, 0, 0, 2], [1, 1, 0, 2], [0, 0, 0, 4], [0, 1, 0, 3]])
    m = summarize(counts, patients=["a", "a", "b", "b"])
    # a: tp 3, fp 1 -> 6/7; b: no tumour, a false positive -> 0
    assert m["dice_patient_mean"] == pytest.approx(3 / 7) and m["dice_patient_median"] == pytest.approx(3 / 7)


def test_undefined_averages_are_none():
    m = summarize(torch.tensor([[0, 0, 0, 4]]))
    assert m["dice_slice"] is None and m["empty_fp_rate"] == 0.0
    m = summarize(torch.tensor([[1, 0, 0, 3]]))
    assert m["empty_fp_rate"] is None


def test_largest_component_keeps_the_biggest_blob():
    v = np.zeros((3, 8, 8), bool)
    v[0, 0, 0] = True
    v[1:3, 4:7, 4:7] = True
    kept = largest_component(v)
    assert kept.sum() == 18 and not kept[0, 0, 0]


def test_hd95_of_two_points_is_their_distance():
    p, t = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    p[0, 0, 0], t[0, 0, 3] = True, True
    assert hd95(p, t) == pytest.approx(3.0)
    assert hd95(t, t) == 0.0


def test_volume_metrics_put_empty_patients_apart():
    pred, truth = np.zeros((4, 6, 6), bool), np.zeros((4, 6, 6), bool)
    truth[0:2, 1:3, 1:3] = True
    pred[0:2, 1:3, 1:3] = True
    pred[0, 5, 5] = True  # a stray voxel, removed by the largest component
    truth[2, 2, 2] = True  # patient b: tumour missed entirely
    m = volume_metrics(pred, truth, ["a", "a", "b", "b"])
    assert m["dice_patient_lcc_mean"] == pytest.approx(0.5)  # a: 1.0 after LCC, b: 0.0
    assert m["hd95_patients"] == 1 and m["hd95_excluded"] == 1
    # hd95 is of the raw prediction: 8 surface voxels at 0 and the stray one at sqrt(3^2 + 3^2) from
    # the truth; numpy's 95th percentile of those 9 distances interpolates 0.6 of the way to it
    assert m["hd95_patient_mean"] == pytest.approx(0.6 * 18**0.5)
