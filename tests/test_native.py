"""Every metric is counted at native resolution: against the masks as released, whatever size the
network ran at (a tumour that vanishes when the mask is resized is still a tumour to find)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, train
from PIL import Image

from common import data, metrics, registry
from common.cache import open_dataset
from common.inference import load_model
from common.synthetic import write_phantoms


def tiny_tumour_data(root):
    """4 phantom patients x 6 slices at 128 px; in every patient's last slice the tumour is replaced
    by one of 1 x 2 pixels that resizing the mask to 64 px loses (nearest keeps rows 2i + 1)."""
    root = write_phantoms(root, patients=4, slices=6, size=128, seed=3)
    for folder in sorted(root.iterdir()):
        mask = np.zeros((128, 128), np.uint8)
        mask[64, 64:66] = 255
        Image.fromarray(mask).save(folder / f"{folder.name}_6_mask.tif")
    return root


def test_native_logits_resize_the_whole_slice_or_put_a_box_back():
    logits = torch.randn(2, 1, 8, 8)
    shapes, full = np.array([[16, 16], [16, 16]]), np.array([[0, 0, 16, 16], [0, 0, 16, 16]])
    same = F.interpolate(logits, (16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(metrics.native_logits(logits, shapes, full, (16, 16)), same)
    # a box partly beyond a 12 x 10 slice (zero-padded to 16 x 16): inside it the box's logits, else -inf
    ones = torch.ones(1, 1, 8, 8)
    out = metrics.native_logits(ones, np.array([[12, 10]]), np.array([[4, 2, 20, 18]]), (16, 16))[0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 2:10] = True
    assert torch.equal(out > 0, expected)


def test_padded_slices_count_no_true_negatives_beyond_their_size():
    logits, truth = torch.full((1, 4, 4), -1.0), torch.zeros(1, 4, 4)
    assert metrics.confusion(logits, truth, torch.tensor([6])).tolist() == [[0, 0, 0, 6]]


def test_the_cache_keeps_the_released_masks_beside_the_resized_ones(tmp_path):
    root = tiny_tumour_data(tmp_path / "kaggle_3m")
    slices, cache = open_dataset(root, tmp_path / "cache", 64)
    last = [i for i, s in enumerate(slices) if s.n == 6]
    assert cache.masks[last].sum() == 0  # lost at 64 px
    native = cache.native_masks(last)
    assert native.shape == (4, 128, 128) and native.sum(axis=(1, 2)).tolist() == [2] * 4
    released = np.stack([np.array(Image.open(slices[i].mask)) > 0 for i in range(len(slices))])
    assert np.array_equal(cache.native_masks(range(len(slices))), released)


def test_a_64_px_run_is_scored_against_the_tiffs(tmp_path, env):
    """The run's per-patient test Dice equals one computed here from the TIFFs: its logits at 64 px,
    resized to 128 px (bilinear), thresholded, against the masks read from disk."""
    root = tiny_tumour_data(tmp_path / "kaggle_3m")
    out = tmp_path / "run"
    train("unet", "--data-dir", str(root), *TINY, "--output-dir", str(out), env=env)
    summary = json.loads((out / "summary.json").read_text())
    test = json.loads((out / "split.json").read_text())["test"]
    model, _ = load_model(out / "best.pt")
    rows = {r["patient"]: r for r in summary["test"]["per_patient"]}
    assert summary["test"]["scored_at"] == "native" and sorted(rows) == sorted(test)
    for patient in test:
        files = sorted((root / patient).glob("*_[0-9].tif"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
        images = np.stack([np.array(Image.open(f).resize((64, 64), Image.BILINEAR)) for f in files])
        truth = np.stack([np.array(Image.open(f.with_name(f.stem + "_mask.tif"))) > 0 for f in files])
        x, _ = data.to_inputs(torch.from_numpy(images), torch.zeros(len(files), 64, 64, dtype=torch.uint8))
        with torch.no_grad():
            logits = F.interpolate(model(x), (128, 128), mode="bilinear", align_corners=False)
        pred = (logits[:, 0] > 0).numpy()
        tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
        assert rows[patient]["tumour_voxels"] == truth.sum()  # the 2-pixel tumour is counted
        assert (rows[patient]["tp"], rows[patient]["fp"], rows[patient]["fn"]) == (tp, fp, fn)
        assert abs(rows[patient]["dice"] - metrics.ratio(2 * tp, 2 * tp + fp + fn)) < 1e-12


def test_results_keep_runs_on_phantoms_apart_from_runs_on_patients(tmp_path):
    from tools import results

    def summary(source, patients):
        return {"model": "unet", "data": {"source": source, "path": "x/kaggle_3m", "patients": patients}}

    runs = [tmp_path / "real", tmp_path / "phantom", tmp_path / "old"]
    text = results.markdown(runs, [summary("folder", 110), summary("phantoms", 10), {"model": "unet"}])
    headings = [line for line in text.splitlines() if line.startswith("## Data")]
    assert headings == [  # in the order given, phantoms last
        "## Data: kaggle_3m, 110 patients",
        "## Data: data not recorded (a run of an older version)",
        "## Data: phantoms, 10 patients",
    ]
    real, phantom = text.index("| real |"), text.index("| phantom |")
    assert text.index("## Data: kaggle_3m") < real < text.index("## Data: phantoms") < phantom


def test_the_scoring_benchmark_times_both_ways_of_counting(phantoms, tmp_path):
    from tools import bench

    where = ["--data-dir", str(phantoms), "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path)]
    size = ["--image-size", "32", "--width", "0.125", "--batch-size", "4", "--warmup", "1", "--batches", "2"]
    argv = ["scoring", *where, *size]
    assert bench.main(argv) == 0
    rows = (tmp_path / "scoring.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows[1:]] == ["forward", "resized masks", "native"]


@pytest.mark.parametrize(
    "trained",
    [
        {},
        {"context": 1},
        {"normalize": "volume"},
        {"crop": "brain"},
        {"context": 1, "normalize": "volume", "crop": "brain"},
    ],
)
def test_every_consumer_of_a_checkpoint_feeds_it_as_it_was_trained(tmp_path, trained):
    """tools.predict (from the TIFFs) and the comparison's figure (from the cache the runs used) give
    one model the same masks, whatever it was trained with (its neighbours, normalisation, crop)."""
    from common import comparison as compare
    from common import inference as predict

    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=5, size=64, seed=1)
    torch.manual_seed(0)
    config = {"model": "unet", "width": 0.125, "image_size": 64, **trained}
    model = registry.build(config)
    for m in model.modules():  # at PyTorch's default scale an untrained U-Net's logits are all alike
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    model.eval()
    slices = data.discover(root)
    patients = [s.patient for s in slices]
    images = [data.read_native(s)[0] for s in slices]
    from_tiffs = predict.predict_native(model, config, images, patients, "cpu")
    _, cache = open_dataset(root, tmp_path / "cache", 64, crop=config.get("crop", "none"))
    from_cache = predict.native_masks(model, config, cache, range(len(slices)), patients)
    assert 0 < sum(m.sum() for m in from_tiffs) < sum(m.size for m in from_tiffs)  # not all alike
    assert all(np.array_equal(a, b) for a, b in zip(from_tiffs, from_cache))
    folders = {}
    for name in ("unet", "fcn"):  # beside a model fed plain slices
        folders[name] = tmp_path / name
        folders[name].mkdir()
        own = config if name == "unet" else {"model": "fcn", "width": 0.125, "image_size": 64}
        net = model if name == "unet" else registry.build(own)
        torch.save({"model": net.state_dict(), "config": own}, folders[name] / "best.pt")
    args = {"data_dir": str(root), "cache_dir": str(tmp_path / "cache"), "image_size": 64}
    runs = {n: (args, {}, {"test": sorted(set(patients))}) for n in folders}
    compare.prediction_figure(tmp_path, list(folders), runs, folders)
    assert (tmp_path / "predictions.png").is_file()
