import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run, script_module, train
from PIL import Image

from common import data
from common.cache import load_cache, open_dataset
from common.errors import UserError
from common.split import split
from common.synthetic import write_phantoms
from tools.pack import write_pack


def fake_slices(patients, per_patient):
    return [
        data.Slice(f"P{p:02d}", n, None, None) for p in range(patients) for n in range(1, per_patient + 1)
    ]


def test_discover_reads_the_kaggle_layout(phantoms):
    (phantoms / "data.csv").write_text("ignored\n")
    (phantoms / phantoms.iterdir().__next__().name / "notes.txt").write_text("ignored\n")
    slices = data.discover(phantoms)
    assert len(slices) == 4 * 6
    assert len({s.patient for s in slices}) == 4
    first = [s.n for s in slices if s.patient == slices[0].patient]
    assert first == sorted(first)  # numeric order: 2 before 10
    assert all(s.mask.name == s.image.name.replace(".tif", "_mask.tif") for s in slices)


def test_numeric_slice_order(tmp_path):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=1, slices=11, size=32)
    assert [s.n for s in data.discover(root)] == list(range(1, 12))


def test_patient_split_keeps_patients_on_one_side_and_is_stable():
    slices = fake_slices(20, 5)
    a = split(slices, "patient", 0.2, 0.1, seed=7)
    assert a == split(slices, "patient", 0.2, 0.1, seed=7)
    assert a != split(slices, "patient", 0.2, 0.1, seed=8)
    sides = {name: {slices[i].patient for i in idx} for name, idx in a.items()}
    assert not (
        sides["train"] & sides["val"] or sides["train"] & sides["test"] or sides["val"] & sides["test"]
    )
    assert [len(sides[k]) for k in ("train", "val", "test")] == [14, 4, 2]
    assert sorted(i for idx in a.values() for i in idx) == list(range(len(slices)))


def test_slice_split_leaks_patients_as_the_original_did():
    slices = fake_slices(10, 20)
    s = split(slices, "slice", 0.2, 0.0, seed=233)
    assert len(s["val"]) == 40 and not s["test"]
    assert {slices[i].patient for i in s["train"]} & {slices[i].patient for i in s["val"]}


def test_split_needs_patients_left_to_train():
    with pytest.raises(UserError, match="--val-frac"):
        split(fake_slices(2, 3), "patient", 0.2, 0.1, seed=0)


def test_cache_is_reused_then_rebuilt_when_a_file_changes(tmp_path):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=2, slices=3, size=64)
    cache = tmp_path / "cache"
    slices = data.discover(root)
    c = load_cache(slices, root, cache, 64)
    images, masks, tumour_pixels = c.images, c.masks, c.tumour
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1} and masks.any()
    assert tumour_pixels.tolist() == masks.reshape(6, -1).sum(1).tolist()
    first = next(cache.iterdir())
    stamp = (first / "images.npy").stat().st_mtime_ns
    load_cache(slices, root, cache, 64)
    assert [p.name for p in cache.iterdir()] == [first.name] and (
        first / "images.npy"
    ).stat().st_mtime_ns == stamp

    mask_file = slices[0].mask
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask_file)
    os.utime(mask_file, ns=(1, 1))
    masks2 = load_cache(data.discover(root), root, cache, 64).masks
    assert len(list(cache.iterdir())) == 2 and not masks2[0].any()


def test_cache_resizes(tmp_path):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=1, slices=2, size=64)
    c = load_cache(data.discover(root), root, tmp_path / "cache", 32)
    images, masks = c.images, c.masks
    assert images.shape == (2, 32, 32, 3) and masks.shape == (2, 32, 32)


def broken(kind, root):
    """Make a copy of the phantoms broken in one way; return the path the error must name."""
    patient = next(p for p in sorted(root.iterdir()) if p.is_dir())
    image = patient / f"{patient.name}_2.tif"
    mask = patient / f"{patient.name}_2_mask.tif"
    if kind == "image without mask":
        mask.unlink()
        return image
    if kind == "mask without image":
        image.unlink()
        return mask
    if kind == "zero-byte tiff":
        image.write_bytes(b"")
        return image
    if kind == "truncated tiff":
        image.write_bytes(image.read_bytes()[:300])
        return image
    if kind == "not a tiff":
        image.write_text("hello")
        return image
    if kind == "mask of another size":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
        return mask
    if kind == "mask values":
        Image.fromarray(np.full((64, 64), 7, np.uint8)).save(mask)
        return mask
    if kind == "one-channel image":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
        return image
    if kind == "single-slice patient":
        for f in patient.glob("*.tif"):
            if f.name not in (image.name, mask.name):
                f.unlink()
        return patient
    raise ValueError(kind)


KINDS = [
    "image without mask",
    "mask without image",
    "zero-byte tiff",
    "truncated tiff",
    "not a tiff",
    "mask of another size",
    "mask values",
    "one-channel image",
    "single-slice patient",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_data_is_named(kind, phantoms, tmp_path):
    root = tmp_path / "kaggle_3m"
    shutil.copytree(phantoms, root)
    path = broken(kind, root)
    with pytest.raises(UserError, match=path.name):
        load_cache(data.discover(root), root, tmp_path / "cache", 64)
    assert list((tmp_path / "cache").glob("*")) == []  # no cache, not even half of one


@pytest.mark.parametrize(
    "layout", ["missing", "file", "empty", "no patient folders", "empty patient folders"]
)
def test_bad_folders(layout, tmp_path):
    root = tmp_path / "kaggle_3m"
    if layout == "file":
        root.write_text("")
    elif layout != "missing":
        root.mkdir()
    if layout == "no patient folders":
        (root / "data.csv").write_text("")
    if layout == "empty patient folders":
        (root / "TCGA_XX_0000_20000101").mkdir()
    with pytest.raises(UserError, match="kaggle_3m"):
        data.discover(root)


def test_batches_are_read_whole_and_stay_uint8(tmp_path):
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    masks = np.zeros((5, 4, 4), np.uint8)
    ds = data.Slices(images, masks, [4, 0, 2])
    x, y, idx = ds.__getitems__([0, 2])
    assert (
        idx.tolist() == [2, 4] and x.dtype == torch.uint8 and torch.equal(x[1], torch.from_numpy(images[4]))
    )
    parts = {"train": [], "val": [4, 0, 2], "test": []}
    batches = list(
        data.loaders(parts, "cached", None, images, masks, 4, 2, 0, False, torch.device("cpu"))["val"]
    )
    assert [b[2].tolist() for b in batches] == [[0, 4], [2]]


@pytest.mark.parametrize("workers", [0, 1])
def test_the_three_pipelines_give_the_same_batches(phantoms, tmp_path, workers):
    slices = data.discover(phantoms)
    c = load_cache(slices, phantoms, tmp_path / "cache", 32)
    images, masks = c.images, c.masks
    parts = {"train": [], "val": list(range(1, 24, 2)), "test": []}
    batches = {}
    for pipeline in ("decode", "cached", "device"):
        w = 0 if pipeline == "device" else workers
        batches[pipeline] = list(
            data.loaders(parts, pipeline, slices, images, masks, 32, 5, w, False, torch.device("cpu"))["val"]
        )
    assert [len(b[0]) for b in batches["decode"]] == [5, 5, 2]
    for pipeline in ("cached", "device"):
        for a, b in zip(batches["decode"], batches[pipeline]):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), pipeline


def test_inputs_are_normalised_per_slice_and_channel():
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    masks = torch.randint(0, 2, (3, 32, 32), dtype=torch.uint8)
    x, y = data.to_inputs(images, masks)
    assert x.shape == (3, 3, 32, 32) and y.shape == (3, 1, 32, 32)
    assert torch.allclose(x.mean((2, 3)), torch.zeros(3, 3), atol=1e-5)
    assert torch.equal(y[:, 0], masks.float())


def test_augmentation_moves_image_and_mask_together():
    images = torch.zeros((8, 32, 32, 3), dtype=torch.uint8)
    images[:, 8:16, 4:12] = 255  # bright square, and its mask, off-centre
    masks = (images[..., 0] > 0).to(torch.uint8)
    torch.manual_seed(0)
    x, y = data.to_inputs(images, masks, flip=0.5, rotate=15, scale=0.05)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    bright = x[:, 0] > x[:, 0].mean((1, 2), keepdim=True)
    overlap = (bright & (y[:, 0] > 0)).sum((1, 2)) / y[:, 0].sum((1, 2))
    assert (overlap > 0.8).all()
    flipped = x[:, :, :, 16:].sum((1, 2, 3)) > x[:, :, :, :16].sum((1, 2, 3))
    assert 0 < flipped.sum() < 8  # some slices flipped, not all


def test_no_augmentation_changes_nothing_but_scale():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    masks = torch.randint(0, 2, (2, 32, 32), dtype=torch.uint8)
    plain, _ = data.to_inputs(images, masks)
    same, _ = data.to_inputs(images, masks, flip=0.0, rotate=0.0, scale=0.0)
    assert torch.equal(plain, same)


@pytest.mark.parametrize("normalize", ["slice", "volume"])
@pytest.mark.parametrize("stacks", [1, 3])  # --context 1: three slices' channels
def test_a_slice_filled_with_flair_sees_flair_normalised_as_flair(normalize, stacks):
    """--fill-flair: where drawn, the post-contrast (and pre-contrast) input is the FLAIR input, as
    for a patient the release filled so, normalised as FLAIR is (its volume's statistics moved with
    it); every other channel, and every slice not drawn, is the input it was."""
    from common.cache import volume_stats

    images = torch.randint(0, 256, (4, 16, 16, 3 * stacks), dtype=torch.uint8)
    masks = torch.zeros((4, 16, 16), dtype=torch.uint8)
    one = [SimpleNamespace(patient="p")] * 4
    stats = torch.from_numpy(volume_stats(one, images[..., :3].numpy())) if normalize == "volume" else None
    pre, post = torch.tensor([True, False, False, True]), torch.tensor([True, True, False, True])
    x = images.permute(0, 3, 1, 2).float().div(255)
    filled, moved = data.fill_flair(x, stats, pre, post)
    got, _ = data.to_inputs((filled * 255).round().byte().permute(0, 2, 3, 1), masks, stats=moved)
    plain, _ = data.to_inputs(images, masks, stats=stats)
    got, plain = got.view(4, stacks, 3, 16, 16), plain.view(4, stacks, 3, 16, 16)
    for channel, where in ((0, pre), (2, post)):
        assert torch.allclose(got[where, :, channel], plain[where, :, 1], atol=1e-4)
        assert torch.equal(got[~where, :, channel], plain[~where, :, channel])
    assert torch.equal(got[:, :, 1], plain[:, :, 1])
    if normalize == "slice":  # what a patient released with those sequences filled gives
        released = images.view(4, 16, 16, stacks, 3).clone()
        released[post, ..., 2], released[pre, ..., 0] = released[post, ..., 1], released[pre, ..., 1]
        assert torch.allclose(got.flatten(1, 2), data.to_inputs(released.view(images.shape), masks)[0])


def test_phantoms_look_like_the_dataset(tmp_path):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=12, size=64, seed=3)
    slices = data.discover(root)
    c = load_cache(slices, root, tmp_path / "cache", 64)
    images, masks = c.images, c.masks
    has_tumour = masks.reshape(len(masks), -1).any(1)
    assert 0.2 < has_tumour.mean() < 0.9  # some slices without tumour
    flair = images[..., 1].astype(float)
    assert flair[masks == 1].mean() > flair[(masks == 0) & (flair > 20)].mean() + 40  # tumour bright in FLAIR


def test_folds_partition_the_non_test_patients_with_balanced_tumour():
    slices = fake_slices(23, 4)
    tumour = np.array([(i // 4) % 3 != 0 for i in range(len(slices))], np.int64) * (
        np.arange(len(slices)) % 4
    )
    runs = [split(slices, "patient", 0.2, 0.1, 5, tumour, folds=4, fold=f) for f in range(4)]
    tests = {tuple(r["test"]) for r in runs}
    assert len(tests) == 1  # the test set is chosen before the folds, the same for every fold
    assert runs[0]["test"] == split(slices, "patient", 0.2, 0.1, 5)["test"]
    vals = [{slices[i].patient for i in r["val"]} for r in runs]
    assert set().union(*vals) == {slices[i].patient for r in runs[:1] for i in r["train"] + r["val"]}
    assert sum(len(v) for v in vals) == len(set().union(*vals))  # each patient validates once
    tumour_slices = [int((tumour[r["val"]] > 0).sum()) for r in runs]
    assert max(tumour_slices) - min(tumour_slices) <= 3


def test_outer_folds_test_every_patient_once_and_validate_on_the_others():
    slices = fake_slices(23, 4)
    tumour = np.array([(i // 4) % 3 != 0 for i in range(len(slices))], np.int64)
    patients = lambda r, side: {slices[i].patient for i in r[side]}  # noqa: E731
    runs = [split(slices, "patient", 0.1, 0.2, 5, tumour, folds=5, test_fold=f) for f in range(5)]
    tests = [patients(r, "test") for r in runs]
    assert sum(len(t) for t in tests) == 23 and set().union(*tests) == {s.patient for s in slices}
    assert max(len(t) for t in tests) - min(len(t) for t in tests) <= 1  # --test-frac plays no part
    for r, t in zip(runs, tests):
        assert len(patients(r, "val")) == 2 and not patients(r, "val") & t and not patients(r, "train") & t
    tumour_patients = [int(tumour[r["test"]].sum()) // 4 for r in runs]
    assert max(tumour_patients) - min(tumour_patients) <= 1
    none = split(slices, "patient", 0, 0.2, 5, tumour, folds=5, test_fold=0)
    assert none["val"] == [] and patients(none, "test") == tests[0]  # --val-frac 0: all the others train


def test_more_folds_than_patients_is_refused():
    with pytest.raises(UserError, match="--folds 9"):
        split(fake_slices(8, 2), "patient", 0.2, 0.1, 0, np.zeros(16), folds=9, fold=0)


def test_an_unreadable_file_is_named(phantoms, monkeypatch):
    """As root, file permissions do not stop a read: the refusal is simulated where PIL opens the file."""
    import PIL.Image

    target = data.discover(phantoms)[0]

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(PIL.Image, "open", refuse)
    with pytest.raises(UserError, match=f"cannot read {target.image}: Permission denied"):
        data.read_pair(target, 64)


def test_a_pack_round_trips_byte_identically_and_trains(phantoms, tmp_path, env):
    written = write_pack(
        phantoms, tmp_path / "p.pack", tmp_path / "c1", size=64, part_size=20_000, progress=False
    )
    assert len(written) > 2  # the manifest and several parts
    slices, built = open_dataset(phantoms, tmp_path / "c1", 64)
    got, cached = open_dataset(tmp_path / "p.pack", tmp_path / "c2", 64)
    assert [(s.patient, s.n) for s in got] == [(s.patient, s.n) for s in slices]
    for name in ("images", "masks", "tumour"):
        a, b = getattr(built, name), getattr(cached, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    cached = {f.name: f.read_bytes() for f in next((tmp_path / "c2").glob("*pack*")).glob("*.npy")}
    built = {f.name: f.read_bytes() for f in next((tmp_path / "c1").glob("lgg-*")).glob("*.npy")}
    assert cached == built  # the cache files themselves, byte for byte
    out = tmp_path / "run"
    train("unet", "--data-dir", str(tmp_path / "p.pack"), *TINY, "--output-dir", str(out), env=env)
    assert json.loads((out / "split.json").read_text())["test"]


def test_tools_pack_writes_and_unpacks_or_refuses_in_one_line(phantoms, tmp_path, env):
    env = {**env, "LGG_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "p.pack"
    bad = run([sys.executable, "-m", "tools.pack", "pack", "--data-dir", str(phantoms), "--out", str(out),
               "--part-size", "-1"], env)  # fmt: skip
    assert (bad.returncode, bad.stderr) == (
        2,
        "error: argument --part-size: must be 0 (one part) or more MiB, got -1\n",
    )
    assert not list(tmp_path.glob("p.pack*"))
    made = run([sys.executable, "-m", "tools.pack", "pack", "--data-dir", str(phantoms), "--out", str(out),
                "--image-size", "64", "--part-size", "0.02"], env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert len(list(tmp_path.glob("p.pack.part*"))) > 1 and "4 patients" in made.stdout
    got = run([sys.executable, "-m", "tools.pack", "unpack", str(out), "--image-size", "64"], env)
    assert got.returncode == 0 and got.stdout.endswith(made.stdout.splitlines()[-1] + "\n"), got.stdout
    missing = run([sys.executable, "-m", "tools.pack", "unpack"], env)
    assert (
        missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    )


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove", "not a pack"])
def test_a_damaged_pack_is_a_one_line_error(phantoms, tmp_path, env, damage):
    written = write_pack(
        phantoms, tmp_path / "p.pack", tmp_path / "c1", size=64, part_size=20_000, progress=False
    )
    part = written[2]
    if damage == "truncate":
        part.write_bytes(part.read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(part.read_bytes())
        b[100] ^= 1
        part.write_bytes(bytes(b))
    elif damage == "remove":
        part.unlink()
    else:
        written[0].write_text("{}")
    p = run([sys.executable, "unet/train.py", "--data-dir", str(written[0]), *TINY], env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error: --data-dir {written[0]}")
    assert (part.name in p.stderr) != (damage == "not a pack")


def tiff16(path, rgb):
    """A 16-bit RGB TIFF (PIL reads it as 8-bit RGB, keeping only each sample's high byte)."""
    import struct

    h, w, _ = rgb.shape
    pixels = rgb.astype("<u2").tobytes()
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, 0), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 0),
            (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1)]  # fmt: skip
    bits_at = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(tags)))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: bits_at + 6}.get(tag, value)
        out += struct.pack("<HHII" if kind == 4 or tag in (258, 273) else "<HHIHH", tag, kind, count, value,
                           *([] if kind == 4 or tag in (258, 273) else [0]))  # fmt: skip
    path.write_bytes(bytes(out + struct.pack("<I3H", 0, 16, 16, 16) + pixels))


def test_no_slice_is_dropped_or_degraded_in_silence(phantoms, tmp_path, capfd):
    root = tmp_path / "kaggle_3m"
    shutil.copytree(phantoms, root)
    first, second = sorted(p for p in root.iterdir())[:2]
    for f in first.iterdir():  # upper-case suffixes, as some copies have them
        f.rename(f.with_name(f.name.replace(".tif", ".TIF")))
    renamed = second.with_name("TCGA_XX_0000_19990101")  # a folder renamed, its files not
    second.rename(renamed)
    slices = data.discover(root)
    assert (
        sum(s.patient == first.name for s in slices) == 6
        and sum(s.patient == renamed.name for s in slices) == 6
    )
    assert f"used as patient {renamed.name}" in capfd.readouterr().err
    stray = next(renamed.iterdir())
    shutil.copy(stray, renamed / stray.name.replace(second.name, "TCGA_YY_0000_19990101"))
    with pytest.raises(UserError, match="holds slices of 2 patients"):
        data.discover(root)


def test_a_16_bit_tiff_is_refused_not_truncated(tmp_path):
    tiff16(tmp_path / "x_1.tif", np.full((8, 8, 3), 40000, np.uint16))
    with pytest.raises(UserError, match="16-bit samples"):
        data.read_tiff(tmp_path / "x_1.tif", ("RGB",))


def test_odd_but_valid_layouts_are_used(phantoms, tmp_path):
    root = tmp_path / "kaggle_3m"
    shutil.copytree(phantoms, root)
    first, second = sorted(root.iterdir())[:2]
    odd = first.with_name("TCGA Ré 0000_19990101")  # spaces and accents, folder and files alike
    odd.mkdir()
    for f in first.iterdir():
        f.rename(odd / f.name.replace(first.name, odd.name))
    first.rmdir()
    shutil.move(second, tmp_path / second.name)  # a patient linked in from elsewhere
    (root / second.name).symlink_to(tmp_path / second.name)
    big = write_phantoms(tmp_path / "big", patients=1, slices=3, size=512, seed=2)  # 512 px slices
    shutil.move(next(big.iterdir()), root / "TCGA_BG_0000_19990101")
    slices = data.discover(root)
    assert {s.patient for s in slices} >= {odd.name, second.name, "TCGA_BG_0000_19990101"}
    assert len(slices) == 4 * 6 + 3
    c = load_cache(slices, root, tmp_path / "cache", 64)
    images, masks = c.images, c.masks
    assert images.shape == (27, 64, 64, 3) and masks.max() == 1


@pytest.mark.parametrize("renamed", [False, True])
@pytest.mark.parametrize("suffix", [" - Copy", "_copy", " (2)"])
def test_a_patient_copied_under_another_name_is_refused_not_split(tmp_path, suffix, renamed):
    """A patient is who its images are: its copy would be split as a second patient, one side tested
    on what the other trained on. Caught as copied (files named after the original) or renamed."""
    from common.split import refuse_copies

    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=1)
    original = sorted(p for p in root.iterdir() if p.is_dir())[1]
    copy = shutil.copytree(original, root / f"{original.name}{suffix}")
    if renamed:
        for f in copy.iterdir():
            f.rename(copy / f.name.replace(original.name, copy.name.replace(" ", "_")))
    slices, cache = open_dataset(root, tmp_path / "cache", 32)
    with pytest.raises(UserError, match=re.escape(f"patients {original.name} and {copy.name} hold the same")):
        refuse_copies(slices, cache.images)
    shutil.rmtree(copy)
    slices, cache = open_dataset(root, tmp_path / "cache", 32)
    refuse_copies(slices, cache.images)  # distinct patients pass


def test_training_on_data_with_a_copied_patient_ends_in_one_line(tmp_path, env):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=4, slices=4, size=32, seed=2)
    original = sorted(p for p in root.iterdir() if p.is_dir())[0]
    shutil.copytree(original, root / f"{original.name} - Copy")
    p = run([sys.executable, "unet/train.py", "--data-dir", str(root), *TINY, "--epochs", "1",
             "--output-dir", str(tmp_path / "run")], env)  # fmt: skip
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]  # after the note on names
    assert p.returncode == 2 and len(errors) == 1 and "hold the same slices" in errors[0], p.stderr
    assert not (tmp_path / "run" / "best.pt").exists()


def as_users_have_it(root, change):
    """A phantom kaggle_3m folder (3 patients of 4 slices) changed as users' copies are."""
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    if change == "appledouble":  # macOS on a foreign disk: ._ beside each file
        for f in list(first.iterdir()):
            (first / f"._{f.name}").write_bytes(b"\0\5\26\7")
    elif change in ("tiff", "TIF"):
        for f in list(first.iterdir()):
            f.rename(f.with_suffix("." + change))
    elif change == "empty":
        (root / "TCGA_ZZ_0000_20000101").mkdir()
    elif change == "gap":
        next(first.glob("*_2.tif")).unlink(), next(first.glob("*_2_mask.tif")).unlink()
    elif change == "dangling":
        (first / f"{first.name}_9.tif").symlink_to(root / "gone.tif")
    return first


@pytest.mark.parametrize(
    "change, outcome",
    [
        ("appledouble", "note: 8 hidden files"),
        ("tiff", 12),
        ("TIF", 12),
        ("empty", "note: 1 of 4 patient folders hold no slices (TCGA_ZZ_0000_20000101): left out"),
        ("gap", "note: slice numbers skip in 1 patients"),
        ("dangling", "error: slice is a broken link"),
    ],
)
def test_data_as_users_have_it_is_read_or_named_never_dropped_in_silence(tmp_path, capsys, change, outcome):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=1)
    as_users_have_it(root, change)
    if isinstance(outcome, str) and outcome.startswith("error:"):
        with pytest.raises(UserError, match=outcome.removeprefix("error: ")):
            data.discover(root)
        return
    slices = data.discover(root)
    if isinstance(outcome, int):  # read as any slice
        assert len(slices) == outcome and capsys.readouterr().err == ""
    else:
        assert outcome in capsys.readouterr().err


def test_training_reads_a_folder_with_macos_files_and_tiff_names(tmp_path, env):
    root = write_phantoms(tmp_path / "kaggle_3m", patients=4, slices=4, size=32, seed=4)
    as_users_have_it(root, "appledouble")
    for f in sorted(p for p in root.iterdir() if p.is_dir())[1].iterdir():
        f.rename(f.with_suffix(".TIFF"))
    p = run([sys.executable, "unet/train.py", "--data-dir", str(root), *TINY, "--epochs", "1",
             "--output-dir", str(tmp_path / "run")], env)  # fmt: skip
    assert p.returncode == 0 and "hidden files" in p.stderr, p.stderr
    assert json.loads((tmp_path / "run" / "split.json").read_text())["train_slices"] > 0


@pytest.mark.parametrize(
    "field", ["image_size", "slices", "patients", "sha256", "parts", "part.name", "part.bytes", "part.sha256"]
)
def test_a_pack_manifest_missing_a_field_is_a_one_line_error(phantoms, tmp_path, env, field):
    """Every field `write` writes, removed in turn: named, never a KeyError."""
    written = write_pack(phantoms, tmp_path / "p.pack", tmp_path / "c1", size=64, progress=False)
    manifest = json.loads(written[0].read_text())
    key, _, inner = field.partition(".")
    del (manifest["parts"][0] if inner else manifest)[inner or key]
    written[0].write_text(json.dumps(manifest))
    p = run([sys.executable, "unet/train.py", "--data-dir", str(written[0]), *TINY], env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "a damaged pack manifest" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("key", ["model", "config", "config.model"])
def test_a_checkpoint_without_its_weights_or_config_is_one_line_everywhere(phantoms, tmp_path, env, key):
    from common import registry

    config = {"model": "unet", "width": 0.125, "image_size": 64}
    ckpt = {"model": registry.build(config).state_dict(), "config": config}
    outer, _, inner = key.partition(".")
    del (ckpt[outer] if inner else ckpt)[inner or outer]
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "best.pt")
    at = ["--checkpoint", str(tmp_path / "run")]
    for cmd in (
        ["-m", "tools.export", *at, "--format", "torchscript"],
        [
            "-m",
            "tools.predict",
            *at,
            "--data-dir",
            str(phantoms),
            "--no-figures",
            "--output-dir",
            str(tmp_path / "p"),
        ],
        ["unet/train.py", "--eval-only", *at, "--data-dir", str(phantoms)],
    ):
        p = run([sys.executable, *cmd], env)
        assert p.returncode == 2 and "not a checkpoint of this repository" in p.stderr, (cmd, p.stderr)
        assert "Traceback" not in p.stderr


def test_the_cache_of_a_data_folder_whose_files_changed_is_replaced_not_kept(tmp_path, capsys):
    """Copied or extracted again (new modification times), a folder gets a new cache; the old one
    would never be read again, so it goes (~1 GB for the full set), said in a line."""
    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=1)
    open_dataset(root, tmp_path / "cache", 32, progress=True)
    other = write_phantoms(tmp_path / "other" / "kaggle_3m", patients=3, slices=4, size=32, seed=2)
    open_dataset(other, tmp_path / "cache", 32, progress=True)  # another folder's cache stays
    assert len(list((tmp_path / "cache").glob("lgg-32px-*"))) == 2
    first = next(root.glob("*/*_1.tif"))
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    open_dataset(root, tmp_path / "cache", 32, progress=True)
    assert len(list((tmp_path / "cache").glob("lgg-32px-*"))) == 2
    assert "note: removed" in capsys.readouterr().out


def test_a_pack_of_slices_of_other_sizes_is_refused_not_resampled(tmp_path):
    """A pack holds slices at --image-size: 240 px slices in it would be resampled, and the scores
    made on them called native."""
    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=4, size=64, seed=1)
    odd = write_phantoms(tmp_path / "odd" / "kaggle_3m", patients=1, slices=4, size=96, seed=2)
    patient = next(p for p in odd.iterdir() if p.is_dir())
    shutil.copytree(patient, root / "TCGA_ZZ_0001_20000101")
    for f in (root / "TCGA_ZZ_0001_20000101").iterdir():
        f.rename(f.with_name("TCGA_ZZ_0001_20000101_" + f.name.split("_", 4)[-1]))
    with pytest.raises(
        UserError,
        match=r"--image-size 64: 4 slices of .* are not 64x64 \(TCGA_ZZ_0001_20000101_\d+\.tif is 96x96\)",
    ):
        write_pack(root, tmp_path / "p.pack", tmp_path / "cache", size=64, progress=False)
    assert not list(tmp_path.glob("p.pack*"))


def test_a_pack_that_cannot_be_written_leaves_no_part(phantoms, tmp_path, monkeypatch):
    """--out a folder, or a disk that fills part-way: one line, and no part without its manifest."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="--out .*folder: a folder; name the pack's manifest file"):
        write_pack(phantoms, tmp_path / "folder", tmp_path / "c", size=64, progress=False)
    from common import pack

    real, calls = pack.put, []

    def full_disk(path, write):  # the second part finds the disk full
        calls.append(path)
        if len(calls) == 2:
            raise UserError(f"cannot write {path}: No space left on device")
        real(path, write)

    monkeypatch.setattr(pack, "put", full_disk)
    with pytest.raises(UserError, match="No space left"):
        write_pack(phantoms, tmp_path / "p.pack", tmp_path / "c", size=64, part_size=20_000, progress=False)
    assert list(tmp_path.glob("p.pack*")) == [] and list((tmp_path / "folder").iterdir()) == []
    assert not list(tmp_path.glob("folder.part*"))


@pytest.mark.parametrize("sequences, filled", [("post", [2]), ("both", [0, 2])])
def test_the_filled_copy_of_validation_patients_is_what_the_release_gives_a_patient_lacking_them(
    tmp_path, sequences, filled
):
    """docs/studies/per-model/filled.py: the run's validation patients only, FLAIR in the named
    sequences' channels, every other channel and every mask as released."""
    root = write_phantoms(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=1)
    val = sorted(p.name for p in root.iterdir() if p.is_dir())[:2]
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "val": val, "test": []}))
    out = tmp_path / "filled"
    filled_py = script_module(ROOT / "docs/studies/per-model/filled.py")
    assert filled_py.main(["--data-dir", str(root), "--split", str(tmp_path / "split.json"),
                           "--sequences", sequences, str(out)]) in (0, None)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == val
    for tif in (root / val[0]).glob("*.tif"):
        a, b = np.asarray(Image.open(tif)), np.asarray(Image.open(out / val[0] / tif.name))
        if tif.stem.endswith("_mask"):
            assert np.array_equal(a, b)
            continue
        kept = [c for c in range(3) if c not in filled]
        assert np.array_equal(b[..., kept], a[..., kept])
        assert all(np.array_equal(b[..., c], a[..., 1]) for c in filled)
