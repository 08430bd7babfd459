"""The recipe's parts (docs/studies/stronger-recipe): neighbouring slices, test-time mirroring,
ensembles, and the cosine schedule, each checked against what it must compute."""

import csv
import json
import math
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import nibabel
import numpy as np
import pytest
import torch
from conftest import TINY, run, train
from PIL import Image

from common import data, registry
from common.inference import Averaged
from common.loop import RunState, make_schedule


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_neighbours_stay_within_their_patient_and_repeat_the_edges():
    slices = [SimpleNamespace(patient=p) for p in "AAABB"]
    near = data.neighbours(slices, 1)
    assert near.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 4]]
    assert data.neighbours(slices, 2)[3].tolist() == [3, 3, 3, 4, 4]


@pytest.mark.parametrize("on_device", [False, True])
def test_context_stacks_each_slices_neighbours_along_the_channels(on_device):
    slices = [SimpleNamespace(patient=p) for p in "AAABB"]
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * 10 + np.arange(3, dtype=np.uint8)
    images = np.broadcast_to(images, (5, 4, 4, 3)).copy()  # slice i, channel c: 10 i + c
    masks = np.zeros((5, 4, 4), np.uint8)
    if on_device:
        images, masks = torch.from_numpy(images), torch.from_numpy(masks)
    ds = data.Slices(images, masks, [0, 2, 3], data.neighbours(slices, 1))
    x, _, sel = ds.__getitems__([0, 1, 2])
    assert x.shape == (3, 4, 4, 9) and sel.tolist() == [0, 2, 3]
    channels = torch.as_tensor(x)[:, 0, 0].tolist()
    assert channels[0] == [0, 1, 2, 0, 1, 2, 10, 11, 12]  # first slice: itself repeated before it
    assert channels[1] == [10, 11, 12, 20, 21, 22, 20, 21, 22]  # last of patient A
    assert channels[2] == [30, 31, 32, 30, 31, 32, 40, 41, 42]  # B's first: not A's last


class Ramp(torch.nn.Module):
    """Logit = the first channel times a left-to-right ramp: not mirror-symmetric."""

    def forward(self, x):
        return x[:, :1] * torch.linspace(-1, 2, x.shape[-1])


def test_mirroring_and_ensembles_average_probabilities():
    x = torch.randn(2, 3, 4, 6)
    one = Ramp()(x)
    mirrored = Ramp()(x.flip(-1)).flip(-1)
    expected = (torch.sigmoid(one) + torch.sigmoid(mirrored)) / 2
    assert torch.allclose(torch.sigmoid(Averaged([Ramp()], mirror=True)(x)), expected, atol=1e-5)
    assert not torch.allclose(one, mirrored)  # else the test could not tell mirroring from nothing

    class Shift(torch.nn.Module):
        def forward(self, x):
            return x[:, :1] + 1

    both = torch.sigmoid(Averaged([Ramp(), Shift()])(x))
    assert torch.allclose(both, (torch.sigmoid(one) + torch.sigmoid(x[:, :1] + 1)) / 2, atol=1e-5)
    assert torch.equal(Averaged([Ramp()])(x) > 0, one > 0)  # one member: the same decisions


@pytest.mark.parametrize("model", registry.names())
def test_every_model_takes_the_neighbours_as_channels(model):
    net = registry.build({"model": model, "width": 0.125, "image_size": 64, "context": 2})
    assert net(torch.randn(2, 15, 64, 64)).shape == (2, 1, 64, 64)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = Namespace(schedule="cosine", epochs=2, warmup=0.1)
    schedule, lrs = make_schedule(args, opt, 50, RunState()), []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), schedule.step()
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert make_schedule(Namespace(schedule="constant"), opt, 50, RunState()) is None


@pytest.mark.slow
def test_cosine_schedule_resumes_exactly(phantoms, tmp_path, env):
    args = ["--data-dir", str(phantoms), *TINY, "--epochs", "3", "--schedule", "cosine", "--warmup", "0.2"]
    train("unet", *args, "--output-dir", str(tmp_path / "whole"), env=env)
    # --time-limit stops it after its first epoch; the same command with --resume goes on
    train("unet", *args, "--time-limit", "0.001", "--output-dir", str(tmp_path / "cut"), env=env)
    assert len(rows(tmp_path / "cut")) == 1
    train("unet", "--resume", str(tmp_path / "cut"), "--time-limit", "0", env=env)
    whole, cut = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    assert [r["lr"] for r in cut] == pytest.approx([r["lr"] for r in whole], abs=1e-12)
    assert [r["train_loss"] for r in cut] == pytest.approx([r["train_loss"] for r in whole], abs=1e-6)
    assert whole[-1]["lr"] < whole[0]["lr"]


@pytest.mark.slow
def test_context_run_then_tta_evaluation_of_an_ensemble(phantoms, tmp_path, env):
    flags = ["--data-dir", str(phantoms), *TINY, "--context", "1", "--no-test"]
    for seed in (0, 1):
        train(
            "unet", *flags, "--train-seed", str(seed), "--output-dir", str(tmp_path / f"ens/s{seed}"), env=env
        )
    summary = json.loads((tmp_path / "ens/s0/summary.json").read_text())
    assert summary["test"] is None and summary["best_val"]["slices"] == 6 and summary["context"] == 1
    split = [json.loads((tmp_path / f"ens/s{s}/split.json").read_text()) for s in (0, 1)]
    assert split[0] == split[1]  # --train-seed leaves the split alone
    weights = [torch.load(tmp_path / f"ens/s{s}/best.pt", weights_only=True)["model"] for s in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    out = tmp_path / "eval"
    p = train(
        "unet",
        "--eval-only",
        "--checkpoint",
        str(tmp_path / "ens"),
        "--tta",
        "--data-dir",
        str(phantoms),
        "--output-dir",
        str(out),
        env=env,
    )
    result = json.loads((out / "eval.json").read_text())
    assert len(result["members"]) == 2 and result["tta"] and result["context"] == 1
    assert result["val"]["slices"] == 6 and result["test"]["slices"] == 6 and "with TTA" in p.stdout
    patient = sorted(phantoms.iterdir())[0]
    predict = ["-m", "tools.predict", "--checkpoint", str(tmp_path / "ens"), "--tta", "--no-figures"]
    p = run(
        [sys.executable, *predict, "--data-dir", str(patient), "--output-dir", str(tmp_path / "pred")], env
    )
    assert p.returncode == 0, p.stderr
    folder = tmp_path / "pred" / "unet-ensemble"
    volume = nibabel.load(folder / "volumes" / f"{patient.name}.nii.gz").get_fdata()
    masks = sorted(folder.glob("masks/*.tif"), key=lambda f: int(f.stem.split("_")[-2]))
    assert volume.shape == (64, 64, 6) and set(np.unique(volume)) <= {0, 1}
    assert np.array_equal(volume, np.stack([np.array(Image.open(m)) // 255 for m in masks], -1))


def test_an_ensemble_of_folds_is_evaluated_on_the_test_patients_only(phantoms, tmp_path, env):
    for fold in (0, 1):
        train(
            "unet",
            "--data-dir",
            str(phantoms),
            *TINY,
            "--epochs",
            "1",
            "--folds",
            "2",
            "--fold",
            str(fold),
            "--output-dir",
            str(tmp_path / f"folds/fold{fold}"),
            env=env,
        )
    out = tmp_path / "eval"
    p = train(
        "unet",
        "--eval-only",
        "--checkpoint",
        str(tmp_path / "folds"),
        "--data-dir",
        str(phantoms),
        "--output-dir",
        str(out),
        env=env,
    )
    result = json.loads((out / "eval.json").read_text())
    assert "val" not in result and result["test"]["patients"] == 1
    assert "validated on different patients" in p.stdout


def test_context_flags_that_cannot_work_are_refused(no_data_env, tmp_path):
    env = no_data_env  # as on a fresh clone: the flag's error, not the missing data's
    for flags, named in (
        (["--context", "-1"], "--context"),
        (["--context", "1", "--data-pipeline", "decode"], "--context"),
        (["--warmup", "1.5"], "--warmup"),
    ):
        p = run([sys.executable, "unet/train.py", *flags], env)
        assert p.returncode == 2 and p.stderr.startswith(f"error: argument {named}"), p.stderr
    (tmp_path / "nothing").mkdir()
    p = run([sys.executable, "unet/train.py", "--eval-only", "--checkpoint", str(tmp_path / "nothing")], env)
    assert p.returncode == 2 and "no best.pt" in p.stderr


def fake_result(dices, seconds=1.0):
    rows = [
        dict(patient=f"P{i}", dice=d, dice_lcc=d, hd95=1.0, tp=10, fp=1, fn=1, tn=100)
        for i, d in enumerate(dices)
    ]
    return {"per_patient": rows, "eval_time_s": seconds}


def test_the_recipe_table_pairs_each_variant_with_the_plain_one(tmp_path):
    from tools import recipe

    def write(folder, name, content):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text(json.dumps(content))

    plain, tta = [0.5, 0.6, 0.7, 0.8], [0.6, 0.6, 0.9, 0.7]
    write("plain/seed0", "summary.json", {"best_val": fake_result(plain), "test": None})
    epochs = [{"epoch": k, "train_time_s": t} for k, t in enumerate([40, 50, 300], 1)]  # one epoch shared
    (tmp_path / "plain/seed0/metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    write("eval/tta", "eval.json", {"val": fake_result(tta, 2.0)})
    assert recipe.main([str(tmp_path), "--variants", "plain,tta", "--output-dir", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "recipe-val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["plain", "tta"]
    assert float(rows[1]["vs_plain_mean_diff"]) == pytest.approx(0.05)
    assert float(rows[1]["dice_patient_mean"]) == pytest.approx(0.7) and float(rows[1]["train_time_s"]) == 150
    assert "+0.050" in (tmp_path / "out" / "recipe-val.md").read_text()
    assert recipe.main([str(tmp_path), "--variants", "plain,cosine"]) == 2  # not run yet: one line


def test_a_variant_evaluated_from_a_network_trained_elsewhere_has_no_training_time(tmp_path):
    """An --eval-only folder (eval.json alone, e.g. a network scored on a filled copy of its
    validation patients) tabulates beside a run, named by what it scored, its training seconds '-',
    not a traceback."""
    from tools import recipe

    (tmp_path / "run").mkdir()
    (tmp_path / "run/summary.json").write_text(json.dumps({"best_val": fake_result([0.5, 0.6, 0.7, 0.8])}))
    (tmp_path / "run/metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_time_s": 60}) + "\n")
    (tmp_path / "scored").mkdir()
    scored = {"checkpoint": "runs/x/best.pt", "tta": False, "val": fake_result([0.4, 0.6, 0.7, 0.9])}
    (tmp_path / "scored/eval.json").write_text(json.dumps(scored))
    out = tmp_path / "out"
    assert recipe.main([str(tmp_path), "--variants", "scored,run", "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "recipe-val.csv").open()))
    assert [r["train_time_s"] for r in rows] == ["", "60.0"]
    assert "| 1 | - |" in (out / "recipe-val.md").read_text()
    assert rows[0]["what"] == "--eval-only --checkpoint runs/x/best.pt"  # never "the reference's flags"


@pytest.mark.parametrize(
    "mine, said",
    [
        ({"lr": 3e-4}, "--lr 0.0003"),
        ({}, "the reference's flags"),
        ({"made": {"commit": "519564cbacab"}}, "the reference's flags, the code of 519564c"),
    ],
)
def test_a_variant_is_described_by_what_differs_from_the_reference_never_as_the_reference(
    tmp_path, mine, said
):
    from tools import recipe

    for name, content in (("ref", {}), ("other", mine)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps({"lr": content.get("lr", 1e-3)}))
        (tmp_path / name / "summary.json").write_text(json.dumps({"made": content.get("made")}))
    assert recipe.variant(tmp_path, "ref", "ref")[2] == "the reference"
    assert recipe.variant(tmp_path, "other", "ref")[2] == said


ARGS = json.loads((Path(__file__).parents[1] / "docs/studies/per-model/unet-lr1e-3/args.json").read_text())
WHERE = {"data_dir", "cache_dir", "output_dir", "resume", "debug", "log_with", "given", "network_flags"}
WHERE |= {"allow_missing", "time_limit"}  # a run stopped and resumed trains the same


@pytest.mark.parametrize("flag", sorted(set(ARGS) - WHERE))
def test_a_variant_that_differs_in_any_training_flag_is_named_by_it(tmp_path, flag):
    """Every flag a run records but where it reads and writes: a second seed was once labelled
    'the reference's flags', the label listing a chosen few."""
    from tools import recipe

    for name, args in (("ref", ARGS), ("other", {**ARGS, flag: [ARGS[flag]]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps(args))
    assert recipe.variant(tmp_path, "other", "ref")[2].startswith(f"--{flag.replace('_', '-')} ")


def test_time_to_quality_is_the_first_epoch_at_the_target_at_the_runs_median_pace(tmp_path):
    """MLPerf's measure: training seconds until validation Dice per patient first reaches the target;
    an epoch slowed by other work counts at the run's median pace, a run that never reaches it has none."""
    from tools import recipe

    def study_run(name, dices, seconds):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"best_val": fake_result([0.5, 0.9])}))
        epochs = [
            {"epoch": k, "train_time_s": t, "val_dice_patient_mean": d}
            for k, (d, t) in enumerate(zip(dices, seconds), 1)
        ]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))

    study_run("slow", [0.5, 0.7, 0.8, 0.76], [100, 100, 900, 100])  # reaches 0.75 at its 3rd epoch
    study_run("never", [0.5, 0.6, 0.74], [10, 10, 10])
    out = tmp_path / "out"
    assert recipe.main([str(tmp_path), "--variants", "slow,never", "--output-dir", str(out)]) == 0
    with open(out / "recipe-val.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(rows["slow"]["time_to_0.75_s"]) == 300 and rows["never"]["time_to_0.75_s"] == ""
    assert (out / "dice-vs-time.png").stat().st_size > 0
    recipe.main([str(tmp_path), "--variants", "slow,never", "--target", "0.6", "--output-dir", str(out)])
    with open(out / "recipe-val.csv") as f:
        assert [float(r["time_to_0.6_s"]) for r in csv.DictReader(f)] == [200, 20]


@pytest.mark.slow
def test_a_run_from_before_the_cosine_default_resumes_with_its_constant_rate(phantoms, tmp_path, env):
    out = tmp_path / "old"
    train("unet", "--data-dir", str(phantoms), *TINY, "--epochs", "1", "--schedule", "constant",
          "--output-dir", str(out), env=env)  # fmt: skip
    saved = json.loads((out / "args.json").read_text())
    del saved["schedule"], saved["warmup"]  # as args.json was written before the flag existed
    (out / "args.json").write_text(json.dumps(saved))
    train("unet", "--resume", str(out), "--epochs", "2", env=env)
    assert [r["lr"] for r in rows(out)] == [1e-4, 1e-4]
