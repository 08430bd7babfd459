"""run.sh under a real Slurm: a one-node cluster on this machine (tests/slurm/cluster.sh), a job, and
a job array of two models. Skipped, with the reason, where the daemons cannot start."""

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

TINY_JOB = ["--synthetic", "--image-size", "64", "--width", "0.125", "--epochs", "2", "--batch-size", "4"]
# the defaults of run.sh ask for 4 GPUs and 16 CPUs: a small CPU node overrides them, as users do
SMALL = ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=00:10:00"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the Slurm test starts munged, slurmctld and slurmd as root")
    state = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(
        ["bash", str(ROOT / "tests" / "slurm" / "cluster.sh"), str(state)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if p.returncode != 0:
        pytest.skip(f"no Slurm cluster could start here: {p.stdout.strip() or p.stderr.strip()}")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "LGG_CACHE_DIR": str(state / "cache")}
    yield env
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)


def submit(env, *args):
    p = subprocess.run(
        ["sbatch", "--parsable", *SMALL, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def wait(env, job, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if p.returncode == 0 and not p.stdout.strip():
            return
        time.sleep(1)
    pytest.fail(f"job {job} still queued or running after {timeout} s")


def test_sbatch_run_sh_trains_and_writes_its_run_folder(slurm, tmp_path):
    job = submit(
        slurm,
        f"--output={tmp_path}/%x-%j.out",
        "run.sh",
        "unet",
        *TINY_JOB,
        "--output-dir",
        str(tmp_path / "run"),
    )
    wait(slurm, job)
    log = (tmp_path / f"lgg-seg-{job}.out").read_text()
    assert "run.sh: unet on 1 node(s) x 1 process(es)" in log and "error" not in log.lower(), log
    assert (tmp_path / "run" / "summary.json").exists(), log


def test_a_job_array_trains_one_model_per_task(slurm, tmp_path):
    job = submit(slurm, "--array=0-1", f"--output={tmp_path}/%x-%A_%a.out", "run.sh", "unet,fcn", *TINY_JOB)
    wait(slurm, job)
    logs = {i: (tmp_path / f"lgg-seg-{job}_{i}.out").read_text() for i in (0, 1)}
    try:
        for i, model in enumerate(("unet", "fcn")):
            assert f"run.sh: {model} on 1 node(s)" in logs[i], logs[i]
            folder = next(
                line.split()[1].rstrip("/:") for line in logs[i].splitlines() if line.startswith("wrote ")
            )
            assert (ROOT / folder / "summary.json").exists() and f"runs/{model}-" in folder, logs[i]
    finally:
        for log in logs.values():
            for line in log.splitlines():
                if line.startswith("wrote runs/"):
                    subprocess.run(["rm", "-rf", str(ROOT / line.split()[1].rstrip("/:"))])


def test_a_job_array_then_the_table_is_the_comparison(slurm, tmp_path):
    out = tmp_path / "cmp"
    job = submit(
        slurm,
        "--array=0-2",
        f"--output={tmp_path}/%x-%A_%a.out",
        "run.sh",
        "unet,fcn,segnet",
        *TINY_JOB,
        "--epochs",
        "1",
        "--val-frac",
        "0.1",
        "--test-frac",
        "0.2",
        "--output-dir",
        str(out),
    )
    wait(slurm, job)
    logs = "\n".join(f.read_text() for f in tmp_path.glob("*.out"))
    assert all((out / m / "summary.json").exists() for m in ("unet", "fcn", "segnet")), logs
    p = subprocess.run(
        [sys.executable, "-m", "tools.compare", "--table", "--output-dir", str(out)],
        cwd=ROOT,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert (out / "comparison.md").exists() and "FCN-8s - U-Net" in (out / "comparison.md").read_text()
