"""A run folder is the truth for everything that uses the run: its split.json decides resume and
evaluation, and running the same command again always makes progress."""

import json
import shutil
import sys

import pytest
from conftest import TINY, run, train

from common.synthetic import write_phantoms


@pytest.fixture
def six(tmp_path):
    """6 phantom patients (4 train, 1 validate, 1 test with the default fractions)."""
    return write_phantoms(tmp_path / "data" / "kaggle_3m", patients=6, slices=4, size=64, seed=3)


def split_of(folder, name="split.json"):
    return json.loads((folder / name).read_text())


def test_eval_only_uses_the_runs_own_split(six, tmp_path, env):
    out = tmp_path / "run"
    train("unet", "--data-dir", str(six), *TINY, "--seed", "5", "--output-dir", str(out), env=env)
    train("unet", "--data-dir", str(six), "--eval-only", "--checkpoint", str(out / "best.pt"),
          "--output-dir", str(tmp_path / "eval"), env=env)  # fmt: skip
    evaluated = split_of(tmp_path / "eval", "eval.json")["split"]
    assert evaluated["seed"] == 5 and evaluated["test"] == split_of(out)["test"]
    p = run([sys.executable, "unet/train.py", "--data-dir", str(six), "--eval-only", "--checkpoint", str(out),
             "--seed", "0"], env)  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith("error: --seed 0: the run was split with --seed 5")


def test_missing_patients_are_refused_or_with_allow_missing_said(six, tmp_path, env):
    out = tmp_path / "run"
    train("unet", "--data-dir", str(six), *TINY, "--epochs", "1", "--output-dir", str(out), env=env)
    gone = split_of(out)["test"][0]
    shutil.rmtree(six / gone)
    for extra in (["--resume", str(out), "--epochs", "2"], ["--eval-only", "--checkpoint", str(out)]):
        p = run([sys.executable, "unet/train.py", "--data-dir", str(six), *extra], env)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "no longer match the run's split.json" in p.stderr and gone in p.stderr
    train("unet", "--data-dir", str(six), "--eval-only", "--checkpoint", str(out), "--allow-missing",
          "--output-dir", str(tmp_path / "eval"), env=env)  # fmt: skip
    result = split_of(tmp_path / "eval", "eval.json")
    assert "test" not in result and gone in result["split_notes"][0]  # nothing left to test on, and said


def test_resume_keeps_the_split_when_the_data_grow(six, tmp_path, env):
    out = tmp_path / "run"
    train("unet", "--data-dir", str(six), *TINY, "--epochs", "1", "--output-dir", str(out), env=env)
    before = split_of(out)
    other = write_phantoms(tmp_path / "more", patients=1, slices=4, size=64, seed=9)  # a new patient
    new = shutil.copytree(next(p for p in other.iterdir() if p.is_dir()), six / "TCGA_ZZ_0000_20000101")
    for f in new.iterdir():
        f.rename(f.with_name("TCGA_ZZ_0000_20000101_" + f.name.split("_", 4)[-1]))
    p = train("unet", "--resume", str(out), "--epochs", "2", env=env)
    assert "1 patients in the data are not in split.json: left out" in p.stdout
    assert split_of(out) == before and json.loads((out / "summary.json").read_text())["split"]["train"] == \
        before["train_slices"]  # fmt: skip


@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_a_run_stopped_before_its_first_checkpoint_starts_afresh(phantoms, tmp_path, env, again):
    out = tmp_path / "run"
    cmd = ["--data-dir", str(phantoms), *TINY, "--output-dir", str(out)]
    train("unet", *cmd, env=env)
    for f in ("best.pt", "summary.json"):
        (out / f).unlink()
    shutil.rmtree(out / "last")  # as a Ctrl-C, an out-of-memory or a full disk in epoch 1 leaves it
    p = train("unet", *(cmd if not again else ["--resume", str(out)]), env=env)
    assert "starting afresh" in p.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and (out / "summary.json").exists()


def test_the_same_command_again_resumes_and_other_flags_are_refused(phantoms, tmp_path, env):
    out = tmp_path / "run"
    cmd = ["--data-dir", str(phantoms), "--image-size", "64", "--width", "0.125", "--batch-size", "4",
           "--output-dir", str(out)]  # fmt: skip
    train("unet", *cmd, "--epochs", "1", env=env)
    train("unet", *cmd, "--epochs", "1", env=env)  # the same again: resumes, with nothing left to do
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    p = run([sys.executable, "unet/train.py", *cmd, "--epochs", "2"], env)
    assert p.returncode == 2 and "--epochs 1, not 2: continue it with --resume" in p.stderr


def test_one_process_at_a_time_trains_a_run_folder(phantoms, tmp_path, env):
    import subprocess
    import time

    from conftest import ROOT

    out = tmp_path / "run"
    cmd = [sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY, "--epochs", "50",
           "--batch-size", "1", "--output-dir", str(out)]  # fmt: skip
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not (out / "split.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        p = run(cmd, env)
        assert p.returncode == 2 and "another process is training this run" in p.stderr, p.stderr
    finally:
        first.kill()
        first.wait()


def test_more_bad_input_is_one_line(phantoms, tmp_path, env):
    p = run(
        [sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY, "--encoder", "no-such-net"], env
    )
    assert p.returncode == 2 and p.stderr.startswith("error: --encoder no-such-net"), p.stderr
    p = run(
        [sys.executable, "unet/train.py", "--data-dir", str(phantoms), "--checkpoint", str(phantoms)], env
    )
    assert p.returncode == 2 and "only with --eval-only" in p.stderr
    out = tmp_path / "run"
    train("fcn", "--data-dir", str(phantoms), *TINY, "--no-eval", "--output-dir", str(out), env=env)
    (tmp_path / "a-file").write_text("")
    p = run([sys.executable, "-m", "tools.predict", "--checkpoint", str(out), "--data-dir", str(phantoms),
             "--output-dir", str(tmp_path / "a-file")], env)  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith("error: --output-dir"), p.stderr
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "summary.json").write_text("{not json")
    p = run([sys.executable, "-m", "tools.results", str(out), str(tmp_path / "odd"), "--output-dir",
             str(tmp_path / "tables")], env)  # fmt: skip
    assert p.returncode == 0 and "left out" in p.stderr and (tmp_path / "tables" / "curves-fcn.png").exists()


def test_predict_on_the_runs_own_test_patients(six, tmp_path, env):
    out, pred = tmp_path / "run", tmp_path / "pred"
    train("unet", "--data-dir", str(six), *TINY, "--epochs", "1", "--seed", "5", "--output-dir", str(out),
          env=env)  # fmt: skip
    cmd = [sys.executable, "-m", "tools.predict", "--checkpoint", str(out), "--data-dir", str(six),
           "--patients", "test", "--no-figures", "--output-dir", str(pred)]  # fmt: skip
    test = split_of(out)["test"]
    (out / "split.json").unlink()  # the checkpoint carries its split: the same patients without it
    p = run(cmd, env)
    assert p.returncode == 0, p.stdout + p.stderr
    written = {f.name.rsplit("_", 2)[0] for f in (pred / "unet" / "masks").glob("*_pred.tif")}
    assert written == set(test)  # seed 5's test patient, not the flags' defaults
    shutil.rmtree(six / test[0])
    p = run(cmd, env)
    assert p.returncode == 2 and p.stderr.startswith("error: --patients test: no slice"), p.stderr


def test_a_checkpoint_is_tested_on_its_own_test_patients_wherever_it_is(six, tmp_path, env):
    """A best.pt copied out of its run folder, evaluated with other split flags: the patients it was
    tested on are the ones it carries, never the flags' (which would test it on its training ones);
    one whose patients are not known at all is refused."""
    import torch

    out = tmp_path / "run"
    train(
        "unet",
        "--data-dir",
        str(six),
        *TINY,
        "--epochs",
        "1",
        "--seed",
        "5",
        "--output-dir",
        str(out),
        env=env,
    )
    (tmp_path / "loose").mkdir()
    shutil.copy(out / "best.pt", tmp_path / "loose" / "best.pt")
    ev = tmp_path / "eval"
    p = run([sys.executable, "unet/train.py", "--eval-only", "--checkpoint", str(tmp_path / "loose"),
             "--data-dir", str(six), "--output-dir", str(ev)], env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    tested = {r["patient"] for r in json.loads((ev / "eval.json").read_text())["test"]["per_patient"]}
    assert tested == set(split_of(out)["test"])  # seed 5's, not the default seed's
    p = run([sys.executable, "unet/train.py", "--eval-only", "--checkpoint", str(tmp_path / "loose"),
             "--data-dir", str(six), "--seed", "3", "--output-dir", str(tmp_path / "e3")], env)  # fmt: skip
    assert p.returncode == 2 and "would test on patients it trained on" in p.stderr, p.stderr
    ckpt = torch.load(tmp_path / "loose" / "best.pt", weights_only=True)
    del ckpt["split"]  # as checkpoints were before they carried it
    torch.save(ckpt, tmp_path / "loose" / "best.pt")
    p = run([sys.executable, "unet/train.py", "--eval-only", "--checkpoint", str(tmp_path / "loose"),
             "--data-dir", str(six), "--output-dir", str(tmp_path / "eval-old")], env)  # fmt: skip
    assert p.returncode == 2 and "which patients it trained on is not known" in p.stderr, p.stderr
    assert not (tmp_path / "eval-old" / "eval.json").exists()


@pytest.mark.parametrize("layout", ["kaggle_3m", "one patient, output inside"])
def test_predict_new_scans_without_masks(finished, tmp_path, env, layout):
    """The main path of predict: a user's scans, no masks; a patient folder, or a kaggle_3m one."""
    root = write_phantoms(tmp_path / "scans", patients=2, slices=3, size=64, seed=8)
    for mask in root.glob("*/*_mask.tif"):
        mask.unlink()
    data_dir = root if layout == "kaggle_3m" else sorted(p for p in root.iterdir() if p.is_dir())[0]
    out = tmp_path / "pred" if layout == "kaggle_3m" else data_dir / "predictions"
    p = run([sys.executable, "-m", "tools.predict", "--checkpoint", str(finished / "run"), "--data-dir",
             str(data_dir), "--no-figures", "--output-dir", str(out)], env)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(list(out.glob("*/masks/*_pred.tif"))) == (6 if layout == "kaggle_3m" else 3)
    p = run([sys.executable, "-m", "tools.predict", "--checkpoint", str(finished / "run"), "--data-dir",
             str(data_dir), "--no-figures", "--output-dir", str(tmp_path / "again")], env)  # fmt: skip
    assert p.returncode == 0, p.stderr  # the output folder left inside is no patient


def test_predict_names_its_members_scores_where_masks_exist_and_says_whose_patients(finished, tmp_path, env):
    data = finished / "kaggle_3m"
    runs = tmp_path / "runs"
    for k in (1, 2):
        shutil.copytree(finished / "run", runs / f"r{k}")
    p = run([sys.executable, "-m", "tools.predict", "--checkpoint", str(runs), "--data-dir", str(data),
             "--no-figures", "--output-dir", str(tmp_path / "pred")], env)  # fmt: skip
    out = " ".join(p.stdout.split())
    assert p.returncode == 0, p.stderr
    assert f"unet-ensemble: the mean of 2 networks: {runs / 'r1'}, {runs / 'r2'}" in out
    assert "Dice per patient" in out and "(mean of 4)" in out
    assert "trained or validated on: --patients test keeps its test patients" in out
