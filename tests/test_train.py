"""The train.py scripts run as a user runs them: as subprocesses, on tiny phantoms."""

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ONE_STEP, TINY, TWO, run, train
from PIL import Image

FILES = ["args.json", "split.json", "metrics.jsonl", "summary.json", "best.pt", "last"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["unet", "fcn", "segnet"])
def test_tiny_run_writes_the_run_folder(model, phantoms, tmp_path, env):
    out = tmp_path / "run"
    p = train(model, "--data-dir", str(phantoms), *TINY, "--output-dir", str(out), env=env)
    assert all((out / f).exists() for f in FILES)
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == model and summary["world_size"] == 1 and summary["global_batch_size"] == 4
    assert summary["epochs"] == 2 and summary["best_epoch"] in (1, 2) and summary["test"]["slices"] == 6
    assert {"miou_bg", "iou_tumor", "dice"} <= set(summary["best_val"])
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 2 and len(split["val"]) == 1 and len(split["test"]) == 1
    assert not set(split["train"]) & set(split["val"] + split["test"])
    assert "test" in p.stdout and "error" not in p.stderr


def test_resume_continues_as_if_never_stopped(phantoms, tmp_path, env):
    # a constant rate: the cut run's --epochs 1 would otherwise end its own cosine after epoch 1 (the
    # schedule's exact resume is tests/test_recipe.py's)
    args = ["--data-dir", str(phantoms), *TINY, "--schedule", "constant", "--epochs", "3"]
    train("unet", *args, "--output-dir", str(tmp_path / "whole"), env=env)
    train("unet", *args[:-2], "--epochs", "1", "--output-dir", str(tmp_path / "cut"), env=env)
    p = train("unet", "--resume", str(tmp_path / "cut"), "--epochs", "3", env=env)
    assert "resumed: 1 epochs done" in p.stdout  # said where it goes on from
    whole, cut = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    assert [r["epoch"] for r in cut] == [1, 2, 3]
    for a, b in zip(whole, cut):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-6)


def test_resume_needs_a_checkpoint(tmp_path, env):
    (tmp_path / "empty").mkdir()
    p = run([sys.executable, "unet/train.py", "--resume", str(tmp_path / "empty")], env)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--resume" in p.stderr


def test_eval_only_reproduces_the_test_metrics(phantoms, tmp_path, env):
    out = tmp_path / "run"
    train("segnet", "--data-dir", str(phantoms), *TINY, "--output-dir", str(out), env=env)
    train(
        "segnet",
        "--data-dir",
        str(phantoms),
        "--eval-only",
        "--checkpoint",
        str(out / "best.pt"),
        "--output-dir",
        str(tmp_path / "eval"),
        env=env,
    )
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert evaluated["width"] == 0.125 and evaluated["image_size"] == 64  # taken from the checkpoint
    for k in ("miou_bg", "iou_tumor", "dice"):
        assert evaluated["test"][k] == pytest.approx(summary["test"][k], abs=1e-6)
        assert evaluated["val"][k] == pytest.approx(summary["best_val"][k], abs=1e-6)


def test_eval_only_refuses_another_models_checkpoint(phantoms, tmp_path, env):
    out = tmp_path / "run"
    train("segnet", "--data-dir", str(phantoms), *TINY, "--epochs", "1", "--output-dir", str(out), env=env)
    p = run(
        [
            sys.executable,
            "fcn/train.py",
            "--data-dir",
            str(phantoms),
            "--eval-only",
            "--checkpoint",
            str(out),
        ],
        env,
    )
    assert (
        p.returncode == 2
        and p.stderr.strip() == f"error: --checkpoint {out / 'best.pt'} holds a segnet model, not fcn"
    )
    p = run(
        [
            sys.executable,
            "segnet/train.py",
            "--data-dir",
            str(phantoms),
            "--eval-only",
            "--checkpoint",
            str(out / "best.pt"),
            "--width",
            "0.5",
        ],
        env,
    )
    assert p.returncode == 2
    assert (
        p.stderr.strip() == f"error: --checkpoint {out / 'best.pt'} holds a model of --width 0.125, not 0.5"
    )


@pytest.mark.slow
def test_two_gloo_processes_through_accelerate_launch(two_processes):
    # 6 validation and 6 test slices over 2 processes x batch 4: the second process's batch is padded
    summary = json.loads((two_processes / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    assert (
        summary["best_val"]["slices"] == 6 and summary["test"]["slices"] == 6
    )  # no padded duplicates counted


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--epochs", "-1"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--val-frac", "0.6", "--test-frac", "0.5"], "--val-frac"),
        (["--image-size", "100"], "--image-size"),
        (["--bogus"], "--bogus"),
        (["--split", "volume"], "--split"),
        (["--eval-only"], "--checkpoint"),
        (["--eval-only", "--checkpoint", "nowhere.pt"], "nowhere.pt"),
        (["--data-dir", "no/such/folder"], "no/such/folder"),
        (["--output-dir", "README.md"], "--output-dir"),
        (["--eval-only", "--checkpoint", "README.md"], "not a checkpoint"),
        (["--folds", "1"], "--folds"),
        (["--folds", "3", "--fold", "3"], "--fold"),
        (["--test-fold", "0"], "--test-fold"),
        (["--folds", "3", "--fold", "1", "--test-fold", "0"], "--test-fold"),
        (["--val-frac", "0", "--no-eval"], "--val-frac"),
    ],
)
def test_user_errors_end_in_one_line_and_exit_code_2(flags, named, no_data_env):
    # without the data, as on a fresh clone: a flag's error is the flag's, not the missing data's
    p = run([sys.executable, "unet/train.py", *flags], no_data_env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert named in p.stderr and "Traceback" not in p.stderr


def test_contract_holds_in_a_new_process(env):
    """The tests run the scripts in their own process (conftest.run); this once in a new
    interpreter: its exit code, and nothing on stderr after the line (a warning at exit, a thread's
    traceback)."""
    p = run([sys.executable, "unet/train.py", "--data-dir", "no/such/folder"], env, process=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: data folder not found: no/such/folder"), p.stderr


@pytest.mark.parametrize("model", ["unet", "fcn", "segnet"])
def test_help_and_flag_errors_do_not_wait_for_torch(model, tmp_path, env):
    # a torch that cannot be imported: --help and a flag error must not need it (it takes seconds)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch imported')")
    env = {**env, "PYTHONPATH": str(tmp_path)}
    p = run([sys.executable, f"{model}/train.py", "--help"], env)
    assert p.returncode == 0, p.stderr
    assert f"\n    python {model}/train.py --synthetic" in p.stdout  # usage examples kept as written
    p = run([sys.executable, f"{model}/train.py", "--epochs", "0"], env)
    assert p.returncode == 2 and p.stderr.startswith("error: argument --epochs"), p.stderr


def test_debug_shows_the_traceback(env):
    p = run([sys.executable, "unet/train.py", "--data-dir", "no/such/folder", "--debug"], env)
    assert p.returncode != 0 and "Traceback" in p.stderr and "no/such/folder" in p.stderr


def test_output_dir_holding_a_run_is_not_overwritten(phantoms, tmp_path, env):
    out = tmp_path / "run"
    train("unet", "--data-dir", str(phantoms), *TINY, "--epochs", "1", "--output-dir", str(out), env=env)
    p = run(
        [sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY, "--output-dir", str(out)], env
    )
    assert p.returncode == 2 and "--resume" in p.stderr


@pytest.mark.slow
def test_a_synthetic_run_needs_no_data(tmp_path, env):
    """The README's first command (run.sh without Slurm: tests/test_slurm.py)."""
    out = tmp_path / "run"
    small = ["--image-size", "64", "--width", "0.125", "--epochs", "1"]
    p = train("fcn", "--synthetic", *small, "--output-dir", str(out), env=env)
    assert (
        "1 process" in p.stdout
        and json.loads((out / "summary.json").read_text())["data"]["source"] == "phantoms"
    )


def test_run_sh_wants_a_model(env):
    p = run(["bash", "run.sh", "vgg"], env)
    assert p.returncode == 2 and p.stderr.startswith("error:")


def test_a_few_real_patients(real_data, tmp_path, env):
    root = tmp_path / "kaggle_3m"
    root.mkdir()
    for patient in sorted(p for p in real_data.iterdir() if p.is_dir())[:4]:
        (root / patient.name).symlink_to(patient)
    out = tmp_path / "run"
    train("unet", "--data-dir", str(root), *TINY, "--epochs", "1", "--output-dir", str(out), env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"]["train"] > 0 and summary["best_val"]["slices"] > 0
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["config"] == {
        "model": "unet",
        "width": 0.125,
        "encoder": None,
        "image_size": 64,
        "context": 0,
        "normalize": "slice",
        "crop": "none",
    }


@pytest.mark.slow
def test_cross_validation_runs_every_fold_and_reports_mean_and_std(phantoms, tmp_path, env):
    out = tmp_path / "cv"
    p = run(
        [
            sys.executable,
            "-m",
            "tools.folds",
            "unet",
            "--folds",
            "3",
            "--output-dir",
            str(out),
            "--",
            "--data-dir",
            str(phantoms),
            *TINY,
            "--epochs",
            "1",
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    folds = [json.loads((out / f"fold-{i}" / "split.json").read_text()) for i in range(3)]
    assert sorted(sum((f["val"] for f in folds), [])) == sorted(folds[0]["train"] + folds[0]["val"])
    assert len({tuple(f["test"]) for f in folds}) == 1
    cv = json.loads((out / "cv.json").read_text())
    dice = [json.loads((out / f"fold-{i}" / "summary.json").read_text())["test"]["dice"] for i in range(3)]
    assert cv["test"]["dice"][0] == pytest.approx(sum(dice) / 3)
    assert "+-" in (out / "cv.md").read_text()


def test_predict_and_results_from_two_runs(phantoms, tmp_path, env):
    runs = tmp_path / "runs"
    for model in ("unet", "segnet"):
        train(
            model,
            "--data-dir",
            str(phantoms),
            *TINY,
            "--epochs",
            "1",
            "--output-dir",
            str(runs / model),
            env=env,
        )
    patient = sorted(p for p in phantoms.iterdir() if p.is_dir())[0]
    pred = tmp_path / "pred"
    p = run(
        [
            sys.executable,
            "-m",
            "tools.predict",
            "--checkpoint",
            str(runs / "unet"),
            "--checkpoint",
            str(runs / "segnet" / "best.pt"),
            "--data-dir",
            str(patient),
            "--output-dir",
            str(pred),
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    for model in ("unet", "segnet"):
        masks = sorted((pred / model / "masks").glob("*_pred.tif"))
        assert len(masks) == 6 and len(list((pred / model / "figures").glob("*.png"))) == 6
        m = np.asarray(Image.open(masks[0]))
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
    assert (pred / "comparison.png").stat().st_size > 0 and "comparison.png" in p.stdout

    res = tmp_path / "results"
    p = run([sys.executable, "-m", "tools.results", str(runs), "--output-dir", str(res)], env)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (res / "results.md").read_text()
    assert "| unet | unet |" in md and "| segnet | segnet |" in md and "0.8340" in md
    assert (res / "curves-unet.png").exists() and (res / "curves-segnet.png").exists()
    rows = list(csv.DictReader(open(res / "results.csv")))
    assert [r["run"] for r in rows] == ["segnet", "unet", "original-fcn", "original-unet", "original-segnet"]
    summary = json.loads((runs / "unet" / "summary.json").read_text())
    assert float(rows[1]["test_dice"]) == pytest.approx(summary["test"]["dice"])


def test_predict_names_a_bad_folder(env, tmp_path):
    p = run(
        [sys.executable, "-m", "tools.predict", "--checkpoint", str(tmp_path), "--data-dir", str(tmp_path)],
        env,
    )
    assert p.returncode == 2 and p.stderr.startswith("error:") and str(tmp_path) in p.stderr


def test_tensorboard_missing_is_a_clear_error(phantoms, env):
    pytest.importorskip("accelerate")
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    p = run(
        [sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY, "--log-with", "tensorboard"],
        env,
    )
    assert p.returncode == 2 and "pip install tensorboard" in p.stderr


@pytest.mark.slow
def test_sync_bn_over_two_processes_equals_one_process_on_the_whole_batch(
    phantoms, two_processes, tmp_path, env
):
    """One optimiser step (conftest.ONE_STEP): 2 gloo processes x 4 slices with --sync-bn, against 1
    process x 8 slices. The float32 gradients differ by ~5e-4 between reduction orders (1 or 2
    threads already), so lr 0.01 keeps that noise under 1e-5 while a missing sync (~2e-2 in
    gradients) stays far above: the control, the same two processes without --sync-bn
    (conftest.two_processes)."""
    two = ["accelerate", "launch", "--config_file", "accelerate_configs/cpu2.yaml"]
    one_process = ["--data-dir", str(phantoms), *ONE_STEP, "--batch-size", "8"]
    train("unet", *one_process, "--output-dir", str(tmp_path / "one"), env=env)
    sync = ["--data-dir", str(phantoms), *TWO, "--sync-bn", "--output-dir", str(tmp_path / "sync")]
    train("unet", *sync, env=env, launcher=two)  # the control's flags (conftest.TWO), synchronised
    one, sync, local = (
        torch.load(r / "best.pt", weights_only=True)["model"]
        for r in (tmp_path / "one", tmp_path / "sync", two_processes)
    )
    assert one.keys() == sync.keys()
    for k in one:
        assert torch.allclose(one[k].double(), sync[k].double(), rtol=0, atol=1e-5), k
    # the control: batch norm without --sync-bn sees half the batch; its statistics and gradients differ
    for kind in ("running", "weight"):
        assert not all(
            torch.allclose(one[k].double(), local[k].double(), rtol=0, atol=1e-5) for k in one if kind in k
        )


@pytest.mark.slow
def test_time_limit_stops_every_process_at_the_same_epoch(phantoms, tmp_path, env):
    out = tmp_path / "run"
    train(
        "unet",
        "--data-dir",
        str(phantoms),
        *TINY,
        "--epochs",
        "500",
        "--time-limit",
        "6",
        "--output-dir",
        str(out),
        env=env,
        launcher=["accelerate", "launch", "--config_file", "accelerate_configs/cpu2.yaml"],
    )
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["epochs"] < 500 and summary["stopped_by"].startswith("--time-limit 6 s before epoch")
    assert len(rows(out)) == summary["epochs"] and summary["test"] is not None


def test_bad_data_leaves_no_run_folder_and_no_cache(phantoms, tmp_path, env):
    root = tmp_path / "kaggle_3m"
    shutil.copytree(phantoms, root)
    patient = sorted(p for p in root.iterdir() if p.is_dir())[1]
    broken = patient / f"{patient.name}_3.tif"
    broken.write_bytes(broken.read_bytes()[:200])
    p = run(
        [
            sys.executable,
            "unet/train.py",
            "--data-dir",
            str(root),
            *TINY,
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: cannot decode") and str(broken) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    cache = Path(env["LGG_CACHE_DIR"])
    assert not list(cache.glob("*/meta.json")) and not list(cache.glob("*.tmp*"))


def test_a_result_says_when_and_by_what_code_it_was_made(finished):
    made = json.loads((finished / "run" / "summary.json").read_text())["made"]
    assert made["date"].startswith("20") and made["torch"] == torch.__version__
    assert made["commit"] is None or len(made["commit"].removesuffix("+changes")) == 40
    assert set(made) == {"date", "commit", "python", "torch", "torchvision", "accelerate"}


def test_a_log_line_has_the_clock_time_and_the_runs_time_left(capsys):
    from common import report

    ticker = report.Ticker(True, "epoch 1/3", total=10, every=30.0, epochs_after=2)
    clock = iter([10.0, 20.0, 25.0, 40.0])
    ticker.enabled, ticker.clock, ticker.start, ticker.last = True, lambda: next(clock), 0.0, 0.0
    for step in range(1, 5):  # 4 steps in 40 s: 60 s left in the epoch, 260 s in the run
        ticker.tick(step, 16, lambda: 0.5)
    line = capsys.readouterr().out.strip()
    assert re.match(
        r"\d\d:\d\d:\d\d epoch 1/3: step 4/10, 1.6 img/s, loss 0.5000, 60 s left, the run ~4 min$", line
    )
