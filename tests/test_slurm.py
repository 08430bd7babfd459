"""run.sh as users start it: with bash, and under a real Slurm (a one-node cluster on this machine,
tests/slurm/cluster.sh): a job, job arrays over models and over the folds of one. The Slurm tests
skip, with the reason, where the daemons cannot start."""

import getpass
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import CV, LEARNS, ROOT, TINY, run

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
    stop(env)


def stop(env):
    """The cluster's jobs cancelled (a test that failed may leave one running), then its daemons."""
    subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True)
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)


def submit(env, *args, cwd=ROOT):
    p = subprocess.run(
        ["sbatch", "--parsable", *SMALL, *args], cwd=cwd, env=env, capture_output=True, text=True
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


@pytest.mark.slow
def test_sbatch_run_sh_trains_and_writes_its_run_folder(slurm, phantoms, tmp_path):
    job = submit(
        slurm,
        f"--output={tmp_path}/%x-%j.out",
        "run.sh",
        "unet",
        "--data-dir",
        str(phantoms),
        *TINY,
        "--output-dir",
        str(tmp_path / "run"),
    )
    wait(slurm, job)
    log = (tmp_path / f"lgg-seg-{job}.out").read_text()
    assert "run.sh: unet on 1 node(s) x 1 process(es)" in log and "error" not in log.lower(), log
    assert (tmp_path / "run" / "summary.json").exists(), log


@pytest.mark.slow
def test_a_job_array_over_models_and_folds_gives_the_cross_validated_comparisons_table(
    slurm, cross_validated, tmp_path
):
    """Task i trains model i / 2 tested on fold i % 2; the table after the array is the one
    tools.compare --folds 2 made by itself on the same data and flags (conftest.cross_validated).
    Tasks 1 and 2 (U-Net's fold 1, FCN-8s's fold 0) run here, the other two are the reference's own
    folders copied: what the array adds is the task's model and fold, and a table of folders from
    both ways of running."""
    reference, _ = cross_validated
    flags = ["--data-dir", str(reference.parent / "kaggle_3m"), *TINY, "--epochs", "1", *LEARNS]
    out = tmp_path / "cmp"
    for model, fold in (("unet", 0), ("fcn", 1)):
        shutil.copytree(reference / model / f"fold-{fold}", out / model / f"fold-{fold}")
    log = f"--output={tmp_path}/%x-%A_%a.out"
    job = submit(
        slurm, "--array=1-2", log, "run.sh", "unet,fcn", "--folds", "2", *flags, "--output-dir", str(out)
    )
    wait(slurm, job)
    for i, model, fold in ((1, "unet", 1), (2, "fcn", 0)):
        said = (tmp_path / f"lgg-seg-{job}_{i}.out").read_text()
        assert f"run.sh: {model} fold {fold} of 2 on 1 node(s)" in said, said
        assert (out / model / f"fold-{fold}" / "summary.json").exists(), said
    p = run([sys.executable, "-m", "tools.compare", "--table", *CV, "--output-dir", str(out)], slurm)
    assert p.returncode == 0, p.stderr
    assert (out / "per-patient.csv").read_text() == (reference / "per-patient.csv").read_text()


def run_sh(*args, env, cwd=ROOT):
    """bash run.sh as typed in a terminal: its output and errors in the order they came."""
    cmd = ["bash", str(ROOT / "run.sh"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_line(text):
    return text.strip().splitlines()[-1]


def test_run_sh_says_the_scripts_error_line_last_with_its_exit_code(env):
    p = run_sh("unet", "--bad-flag", env=env)
    assert p.returncode == 2 and last_line(p.stdout) == "error: unrecognized arguments: --bad-flag", p.stdout


@pytest.mark.parametrize(
    "args, task, said",
    [
        (
            ["unet", "--folds", "3"],
            "3",
            "error: array task 3, but --folds 3 has folds 0-2: sbatch --array=0-2",
        ),
        (["unet", "--folds", "3", "--fold", "1"], "1", "error: argument --fold: in a job array over --folds"),
        (["unet,fcn", "--folds", "3"], "6", "error: array task 6, but unet,fcn x --folds 3 has tasks 0-5"),
        (
            ["unet,fcn", "--folds", "2", "--fold", "1"],
            "0",
            "error: argument --fold/--test-fold: in a job array",
        ),
        (["unet,fcn"], "2", "error: array task 2, but unet,fcn has tasks 0-1: sbatch --array=0-1"),
    ],
)
def test_run_sh_refuses_an_array_task_it_cannot_place_in_one_line(args, task, said, env):
    p = run_sh(*args, env={**env, "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_JOB_ID": "7"})
    assert p.returncode == 2 and p.stdout.startswith(said) and len(p.stdout.splitlines()) == 1, p.stdout


def test_run_sh_refuses_a_model_list_outside_a_job_array(env):
    """It trained the first model and dropped the others, exit 0."""
    p = run_sh("unet,fcn", "--folds", "2", env={k: v for k, v in env.items() if not k.startswith("SLURM_")})
    assert p.returncode == 2 and len(p.stdout.splitlines()) == 1, p.stdout
    assert p.stdout.startswith(
        "error: a model list (unet,fcn) is for a job array, one task per model and fold"
    )


def test_accelerate_launch_q_ends_with_the_error_line_on_one_process(env):
    cmd = ["accelerate", "launch", "-q", "--config_file", "accelerate_configs/cpu.yaml", "unet/train.py"]
    p = subprocess.run(
        [*cmd, "--bad-flag"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert p.returncode != 0 and last_line(p.stdout) == "error: unrecognized arguments: --bad-flag", p.stdout


def test_accelerate_launch_on_two_processes_says_the_error_line_once_above_torchruns_report(env):
    """accelerate ignores -q with torchrun, whose report of the failure comes after the script has
    ended: the line cannot be last there (run.sh says it again after the report)."""
    cmd = ["accelerate", "launch", "-q", "--config_file", "accelerate_configs/cpu2.yaml", "unet/train.py"]
    p = subprocess.run(
        [*cmd, "--bad-flag"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    said = [line for line in p.stdout.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and said == ["error: unrecognized arguments: --bad-flag"], p.stdout
    assert "exitcode  : 2" in p.stdout


@pytest.mark.slow
def test_run_sh_from_another_folder_takes_relative_paths_from_there(phantoms, tmp_path, env):
    (tmp_path / "kaggle_3m").symlink_to(phantoms)
    flags = ["--data-dir", "kaggle_3m", "--cache-dir", "cache", *TINY, "--epochs", "1", "--output-dir", "run"]
    p = run_sh("fcn", *flags, env=env, cwd=tmp_path)
    assert p.returncode == 0 and "run.sh: fcn on 1 node(s) x 1 process(es)" in p.stdout, p.stdout
    assert (tmp_path / "run" / "summary.json").exists() and any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_a_job_array_over_folds_then_their_table(slurm, phantoms, tmp_path):
    """Submitted from another folder, with relative paths. Fold 1 fails (its folder holds a run made
    with other flags): the summary covers fold 0 and names fold 1; its task alone, run again once
    the folder is cleared, finishes the folds and prints the table of both."""
    (tmp_path / "kaggle_3m").symlink_to(phantoms)
    (tmp_path / "cv" / "fold-1" / "last").mkdir(parents=True)
    (tmp_path / "cv" / "fold-1" / "args.json").write_text("{}")
    flags = ["unet", "--folds", "2", "--data-dir", "kaggle_3m", *TINY, "--epochs", "1", "--output-dir", "cv"]
    log = f"--output={tmp_path}/%x-%A_%a.out"
    job = submit(slurm, "--array=0-1", log, str(ROOT / "run.sh"), *flags, cwd=tmp_path)
    wait(slurm, job)
    logs = [(tmp_path / f"lgg-seg-{job}_{i}.out").read_text() for i in range(2)]
    assert (tmp_path / "cv" / "fold-0" / "summary.json").exists(), logs
    assert "run.sh: unet fold 1 of 2 on 1 node(s)" in logs[1]
    assert last_line(logs[1]).startswith("error: --output-dir cv/fold-1 holds a run made with"), logs[1]
    record = subprocess.run(
        ["scontrol", "show", "job", f"{job}_1"], env=slurm, capture_output=True, text=True
    )
    assert "ExitCode=2:0" in record.stdout, record.stdout
    summary = [
        sys.executable,
        "-m",
        "tools.folds",
        "unet",
        "--folds",
        "2",
        "--output-dir",
        str(tmp_path / "cv"),
    ]
    p = run([*summary, "--summary"], slurm)
    assert p.returncode == 1 and "(mean +- std over 1 of 2 folds)" in p.stdout, p.stdout + p.stderr
    assert (
        last_line(p.stderr).startswith("error: 1 of 2 folds not finished in") and "fold 1 (failed" in p.stderr
    )
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["finished"] == [0]

    shutil.rmtree(tmp_path / "cv" / "fold-1")
    again = submit(slurm, "--array=1", log, str(ROOT / "run.sh"), *flags, cwd=tmp_path)
    wait(slurm, again)
    log = (tmp_path / f"lgg-seg-{again}_1.out").read_text()
    assert "2-fold cross-validation (mean +- std over folds)" in log, log
    p = run([*summary, "--summary"], slurm)
    assert p.returncode == 0 and json.loads((tmp_path / "cv" / "cv.json").read_text())["finished"] == [0, 1]


def test_run_sh_without_the_environment_says_how_or_takes_the_checkouts_own(env, tmp_path):
    """sbatch from a shell where the environment is not activated: one line saying what to do, or,
    where the checkout has its .venv (the README's set-up), that one."""
    shutil.copy(ROOT / "run.sh", tmp_path / "run.sh")  # a checkout without .venv
    bare = {**env, "PATH": "/usr/bin:/bin"}
    p = subprocess.run(["bash", str(tmp_path / "run.sh"), "unet"], env=bare, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: accelerate not found"), p.stderr
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    venv_bin = os.path.dirname(sys.executable)  # this interpreter's environment stands in for it
    (tmp_path / ".venv" / "bin" / "activate").write_text(
        f'touch "{tmp_path}/activated"; PATH="{venv_bin}:$PATH"\n'
    )
    p = subprocess.run(["bash", str(tmp_path / "run.sh"), "unet"], env=bare, capture_output=True, text=True)
    assert (tmp_path / "activated").exists() and "accelerate not found" not in p.stderr, p.stderr
