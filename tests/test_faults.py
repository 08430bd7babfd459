"""Faults: broken files, a diverging run, kills, a dying process, concurrent caches."""

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY, built_once, compare_env, run, train

from common import data
from common.cache import load_cache
from common.errors import UserError


def test_random_damage_to_tiffs_gives_a_clear_error_or_a_valid_slice(phantoms, tmp_path):
    """Byte flips and truncations of real TIFF files: never anything but UserError naming the file."""
    sample = data.discover(phantoms)[3]
    image, mask = sample.image.read_bytes(), sample.mask.read_bytes()
    rng = random.Random(0)
    outcomes = set()
    for k in range(150):
        damaged = bytearray(image if k % 2 else mask)
        if rng.random() < 0.5:
            damaged = damaged[: rng.randrange(len(damaged))]
        for _ in range(rng.randint(1, 20)):
            if damaged:
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        target = tmp_path / (sample.image.name if k % 2 else sample.mask.name)
        shutil.copy(sample.image, tmp_path / sample.image.name)
        shutil.copy(sample.mask, tmp_path / sample.mask.name)
        target.write_bytes(bytes(damaged))
        try:
            img, m = data.read_pair(
                data.Slice("p", 1, tmp_path / sample.image.name, tmp_path / sample.mask.name), 64
            )
            assert img.shape == (64, 64, 3) and set(np.unique(m)) <= {0, 1}
            outcomes.add("read")
        except UserError as e:
            assert target.name in str(e)
            outcomes.add("error")
    assert outcomes == {"read", "error"}  # both happen: the damage is real, and some of it is harmless


def test_a_cache_without_its_completion_mark_is_rebuilt(phantoms, tmp_path):
    slices = data.discover(phantoms)
    load_cache(slices, phantoms, tmp_path, 64)
    (folder,) = tmp_path.iterdir()
    (folder / "meta.json").unlink()  # as if the build had been killed before the end
    np.save(folder / "masks.npy", np.zeros((1,), np.uint8))  # and had left a half-written file
    masks = load_cache(slices, phantoms, tmp_path, 64).masks
    assert masks.shape == (len(slices), 64, 64) and (folder / "meta.json").exists()


def test_a_complete_cache_with_a_damaged_array_is_rebuilt(phantoms, tmp_path):
    slices = data.discover(phantoms)
    images = load_cache(slices, phantoms, tmp_path, 64).images
    expected = np.array(images)
    (folder,) = tmp_path.iterdir()
    with open(folder / "images.npy", "r+b") as f:  # a disk error, a copy cut short
        f.truncate(1000)
    images = load_cache(slices, phantoms, tmp_path, 64).images
    assert np.array_equal(images, expected)


def build(args):
    slices = data.discover(args[0])
    c = load_cache(slices, *args, 64)
    images, masks = c.images, c.masks
    return int(images.sum()) + int(masks.sum())


@pytest.mark.slow
def test_concurrent_cache_builds_agree(phantoms, tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        sums = pool.map(build, [(phantoms, tmp_path)] * 3)
    assert len(set(sums)) == 1
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no leftovers


def test_a_diverging_run_stops_with_the_epoch_and_step_and_keeps_its_checkpoint(phantoms, tmp_path, env):
    out = tmp_path / "run"
    train("unet", "--data-dir", str(phantoms), *TINY, "--epochs", "1", "--output-dir", str(out), env=env)
    p = run([sys.executable, "unet/train.py", "--resume", str(out), "--epochs", "3", "--lr", "1e38"], env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: non-finite loss at epoch 2, step ") and "(epoch 1)" in p.stderr
    train(
        "unet", "--resume", str(out), "--epochs", "2", "--lr", "1e-4", env=env
    )  # the checkpoint still works
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def rows(out):
    path = out / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines()] if path.exists() else []


# the runs the kill and signal tests stop part-way, and resume: 4 epochs of 1 slice a step
STOPPED = [*TINY, "--batch-size", "1", "--epochs", "4"]


@pytest.fixture(scope="session")
def whole(tmp_path_factory, phantoms):
    """The same run uninterrupted, once in a test session: what a stopped and resumed one must match."""

    def build(root):
        flags = ["--data-dir", str(phantoms), *STOPPED, "--output-dir", str(root / "run")]
        train("unet", *flags, env=compare_env(root))

    return built_once(tmp_path_factory, "whole", build) / "run"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(phantoms, whole, tmp_path, env):
    flags = ["--data-dir", str(phantoms), *STOPPED]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "unet/train.py", *flags, "--output-dir", str(cut)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(rows(cut)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # somewhere in epoch 3: training, validating or saving
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(rows(cut)) < 4, "the run ended before it could be killed"
    train("unet", "--resume", str(cut), env=env)
    resumed = rows(cut)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows(whole), resumed):
        for k in ("train_loss", "val_loss", "val_dice", "val_miou_bg"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["epoch"], k)
    final = [json.loads((r / "summary.json").read_text())["test"] for r in (whole, cut)]
    assert final[0]["dice"] == pytest.approx(final[1]["dice"], abs=1e-6)


@pytest.mark.slow
def test_when_one_process_dies_the_launcher_ends_the_others(phantoms, tmp_path, env):
    out = tmp_path / "run"
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        "accelerate_configs/cpu2.yaml",
        "unet/train.py",
        "--data-dir",
        str(phantoms),
        *TINY,
        "--epochs",
        "500",
        "--output-dir",
        str(out),
    ]
    launcher = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not rows(out) and time.time() < deadline:
            time.sleep(0.1)
        rank1 = [
            pid
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if str(out) in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            and b"RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read()
        ]
        assert rank1, "no process of rank 1 found"
        os.kill(rank1[0], signal.SIGKILL)
        start = time.time()
        code = launcher.wait(timeout=90)  # bounded: no hang
        assert code != 0 and time.time() - start < 90
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.parametrize("sig, delay", [(signal.SIGTERM, 0.05), (signal.SIGTERM, 0.4), (signal.SIGINT, 0.05)])
@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_and_resume_matches(phantoms, whole, tmp_path, env, sig, delay):
    """Slurm's SIGTERM before pre-emption: the run saves (part-way through an epoch, or after it) and
    exits cleanly; --resume then ends exactly where an uninterrupted run does."""
    flags = ["--data-dir", str(phantoms), *STOPPED]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "unet/train.py", *flags, "--output-dir", str(cut)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not rows(cut) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (
        f"stopped by {'SIGTERM' if sig == signal.SIGTERM else 'Ctrl-C'}" in out and f"--resume {cut}" in out
    )
    assert not (cut / "summary.json").exists()  # not finished: no summary that could pass for one
    train("unet", "--resume", str(cut), env=env)
    resumed = rows(cut)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows(whole), resumed):
        for k in ("train_loss", "val_loss", "val_dice"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["epoch"], k)


@pytest.mark.slow
def test_run_sh_under_slurm_requeues_on_sigterm_and_resumes(phantoms, tmp_path, env):
    """Slurm simulated: SLURM_JOB_ID set and a stand-in `scontrol` that records its arguments."""
    job = f"test{os.getpid()}"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (fake / "scontrol").chmod(0o755)
    env = {**env, "SLURM_JOB_ID": job, "SLURM_SUBMIT_DIR": str(tmp_path), "PATH": f"{fake}:{env['PATH']}"}
    # submitted from tmp_path: the job's folder, runs/unet-<job>, lands there (not in the checkout)
    cmd = ["bash", str(ROOT / "run.sh"), "unet", "--data-dir", str(phantoms), *TINY, "--batch-size", "1"]
    cmd += ["--epochs", "5"]
    run_dir = tmp_path / "runs" / f"unet-{job}"
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not rows(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job], out
    assert not (run_dir / "summary.json").exists()

    # the requeued job: the same command finds the run folder and resumes
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["epoch"] for r in rows(run_dir)] == [1, 2, 3, 4, 5]
    assert (run_dir / "summary.json").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job]  # not requeued again


@pytest.mark.slow
def test_a_failing_final_evaluation_keeps_the_training_and_resume_finishes_it(phantoms, tmp_path, env):
    """A package that breaks at the very end (scipy, as once for a new user) costs no training."""
    broken = tmp_path / "broken" / "scipy"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "ndimage.py").write_text(
        "def label(*a, **k):\n    raise RuntimeError('injected failure')\n"
        "binary_erosion = distance_transform_edt = label\n"
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY, "--output-dir", str(out)]
    p = run(cmd, {**env, "PYTHONPATH": os.pathsep.join([str(broken.parent), str(ROOT)])})
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: training ended (2 epochs")
    assert "injected failure" in p.stderr and f"--resume {out}" in p.stderr
    assert (
        all((out / f).exists() for f in ("best.pt", "last", "metrics.jsonl"))
        and not (out / "summary.json").exists()
    )
    assert not list(out.glob("*.tmp*"))
    train("unet", "--resume", str(out), env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test"]["dice_patient_lcc_mean"] is not None
    assert len(summary["test"]["per_patient"]) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB file system (tmpfs), as a nearly full disk or a small quota."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield where
    left = subprocess.run(["umount", str(where)], capture_output=True, text=True)
    assert left.returncode == 0, f"a file left open on it: {left.stderr}"


@pytest.fixture
def read_only(tmp_path):
    """A read-only file system (a tmpfs mounted so): root ignores permission bits, not this."""
    where = tmp_path / "ro"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield where
    left = subprocess.run(["umount", str(where)], capture_output=True, text=True)
    assert left.returncode == 0, f"a file left open on it: {left.stderr}"


def test_unusable_cache_and_output_folders_are_one_line(phantoms, read_only, tmp_path, env):
    flags = [sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY]
    for cache, said in (("README.md", "File exists"), ("README.md/sub", "Not a directory"),
                        (str(read_only / "c"), "Read-only file system")):  # fmt: skip
        p = run([*flags, "--cache-dir", cache, "--output-dir", str(tmp_path / "run")], env)
        assert (
            p.returncode == 2
            and p.stderr == f"error: cannot use {cache} as the cache folder (--cache-dir): {said}\n"
        )
    p = run([*flags, "--output-dir", str(read_only / "run")], env)
    assert p.returncode == 2 and p.stderr.startswith(
        f"error: --output-dir {read_only / 'run'}: cannot write there"
    )
    train(
        "unet",
        "--data-dir",
        str(phantoms),
        *TINY,
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
        env=env,
    )
    p = run([sys.executable, "unet/train.py", "--eval-only", "--checkpoint", str(tmp_path / "run"),
             "--data-dir", str(phantoms), "--output-dir", str(read_only / "eval")], env)  # fmt: skip
    assert p.returncode == 2 and "cannot write there" in p.stderr and "evaluating" not in p.stdout


def test_a_cache_on_a_full_disk_says_so_before_writing(phantoms, small_disk, env):
    p = run([sys.executable, "unet/train.py", "--data-dir", str(phantoms), *TINY, "--image-size", "256",
             "--cache-dir", str(small_disk)], env)  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "not enough space for the decoded data" in p.stderr and "MiB needed" in p.stderr
    assert "--cache-dir" in p.stderr and list(small_disk.iterdir()) == []


@pytest.mark.slow
def test_checkpoints_on_a_full_disk_end_in_one_line_and_leave_nothing_hidden(phantoms, small_disk, env):
    out = small_disk / "run"
    p = run(
        [
            sys.executable,
            "unet/train.py",
            "--data-dir",
            str(phantoms),
            *TINY,
            "--width",
            "1",
            "--output-dir",
            str(out),
        ],
        env,
    )  # fmt: skip  (a 34 M-parameter U-Net: 130 MiB of weights)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (
        p.stderr.startswith(f"error: cannot write {out / 'best.pt'}")
        or "cannot write the checkpoint" in p.stderr
    )
    assert not [f for f in out.iterdir() if ".tmp" in f.name]


def test_temporary_caches_of_dead_processes_are_removed(phantoms, tmp_path):
    import socket

    host = socket.gethostname()
    dead = tmp_path / f"lgg-64px-x.tmp-{host}-{2**22 + 12345}"  # above any pid this machine hands out
    alive = tmp_path / f"lgg-64px-y.tmp-{host}-{os.getpid()}"
    other = tmp_path / "lgg-64px-z.tmp-another-host-1"
    for d in (dead, alive, other):
        d.mkdir()
    load_cache(data.discover(phantoms), phantoms, tmp_path, 48)
    assert not dead.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_signal_to_a_command_that_runs_commands_reaches_its_run_which_saves(phantoms, tmp_path, env, sig):
    """SIGTERM (or Ctrl-C) to tools.compare: its training run gets it, saves and ends, the comparison
    ends in one line, and the same command again resumes the run (no run left going alone)."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "tools.compare", "--models", "unet", "--output-dir", str(out), "--",
           "--data-dir", str(phantoms), *STOPPED]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not rows(out / "unet") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the run's own notes
    assert proc.returncode == 128 + sig and len(errors) == 1 and "same command again resumes" in errors[0], (
        err
    )
    assert (out / "unet" / "last").is_dir() and not (out / "unet" / "summary.json").exists()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr  # the run's lock is free: it ended with its command
    assert [r["epoch"] for r in rows(out / "unet")] == [1, 2, 3, 4]
