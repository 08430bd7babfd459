import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.synthetic import write_phantoms

ROOT = Path(__file__).resolve().parents[1]
# under pytest-xdist (CI: -n 3) runs of two processes take a free port each (the configs'
# main_process_port: 0), and Slurm clusters start one at a time (tests/slurm/cluster.sh), each on
# ports of its own; fixtures costly to build are session-scoped, so that a worker running other
# modules' tests in between does not build them again


def pytest_configure(config):
    """Under pytest-xdist (CI: -n 3 on 2 cores), each worker on one core (worker k on core k mod the
    cores): its torch, and every process its tests start, then take one thread (default_threads
    reads the affinity). Single-threaded processes share a core by time slices, where
    multi-threaded ones oversubscribe it (two processes of 2 threads on 2 cores ran ~3x slower than
    one); a third worker fills the time the Slurm tests spend waiting for their jobs."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not (worker and hasattr(os, "sched_setaffinity")):
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow tests first (the order is kept otherwise): under pytest-xdist, handed out one at a
    time (.ci/run: --maxschedchunk 1), the long ones then start early and the short ones fill the
    workers at the end, where otherwise one long test ran on with the other workers done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:  # .ci/run runs the rest without the data, as a fresh clone would
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)


def built_once(tmp_path_factory, name, build):
    """The folder `name`, made by `build(folder)` once in a test session: under pytest-xdist by the
    first worker that asks, the others waiting on a lock and then reading it (a session fixture
    alone is built by each worker whose tests use it). Returns the folder."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


# a tiny model on tiny phantoms: each run takes seconds on a CPU
TINY = ["--image-size", "64", "--width", "0.125", "--epochs", "2", "--batch-size", "4"]


def compare_in(root, *flags, train=()):
    """tools.compare on 10 phantom patients (7 train, 1 validate, 2 test) in root, tiny models."""
    data = write_phantoms(root / "kaggle_3m", patients=10, slices=4, size=64, seed=2)
    env = compare_env(root)
    cmd = [sys.executable, "-m", "tools.compare", "--output-dir", str(root / "cmp"), *flags]
    tiny = [*TINY, "--epochs", "1"]
    p = run([*cmd, "--", "--data-dir", str(data), *tiny, *train], env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return root / "cmp", env


def checkout_entries():
    """What the checkout holds at its top and in runs/ (where every command writes by default), but
    hidden entries (the tools' caches)."""
    return {
        str(p.relative_to(ROOT))
        for folder in (ROOT, ROOT / "runs")
        if folder.is_dir()
        for p in folder.iterdir()
        if not p.name.startswith(".")
    }


@pytest.fixture(autouse=True)
def writes_nothing_into_the_checkout():
    """Every test: the commands it runs, which run from the repository root, leave the checkout as
    they found it. One run without --output-dir wrote its default runs/<model>-<time> there, a
    folder per test run that a user's `git status` never shows (runs/ is ignored)."""
    before = checkout_entries()
    yield
    assert checkout_entries() <= before, f"wrote into the checkout: {sorted(checkout_entries() - before)}"


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A finished tiny run on 4 phantom patients (built once per test session)."""

    def build(root):
        data = write_phantoms(root / "kaggle_3m", patients=4, slices=4, size=64, seed=3)
        env = compare_env(root)
        train(
            "unet",
            "--data-dir",
            str(data),
            *TINY,
            "--epochs",
            "1",
            "--output-dir",
            str(root / "run"),
            env=env,
        )

    return built_once(tmp_path_factory, "damage", build)


@pytest.fixture(scope="session")
def comparison(tmp_path_factory):
    """A comparison of the three models and the original's split on 10 phantoms (built once)."""
    root = built_once(tmp_path_factory, "compare", lambda root: compare_in(root, "--original"))
    return root / "cmp", compare_env(root)


def compare_env(root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**env, "LGG_CACHE_DIR": str(root / "cache")}


CV = ["--folds", "2", "--models", "unet,fcn"]
LEARNS = ["--epochs", "2", "--lr", "1e-2"]  # U-Net learns the phantoms (Dice ~0.9), FCN-8s not yet


@pytest.fixture(scope="session")
def cross_validated(tmp_path_factory):
    """U-Net and FCN-8s, 2-fold cross-validated on the 10 phantoms (also test_slurm's reference)."""
    root = built_once(tmp_path_factory, "cv", lambda root: compare_in(root, *CV, train=LEARNS))
    return root / "cmp", compare_env(root)


# one optimiser step, its arithmetic easy to follow across processes: BCE only (soft Dice pooled per
# process is not the global one), no augmentation, and SGD (Adam's first step is about lr * sign
# of the gradient, which float noise flips where a gradient is ~0)
ONE_STEP = ["--image-size", "64", "--width", "0.125", "--epochs", "1", "--max-steps", "1", "--loss", "bce",
            "--flip", "0", "--rotate", "0", "--scale", "0", "--optimizer", "sgd", "--lr", "0.01"]  # fmt: skip
# 2 processes x 4 slices, one thread a process as the multi-node runs get (float sums over another
# number of threads differ in their last bits)
TWO = [*ONE_STEP, "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory, phantoms):
    """U-Net, one step by 2 gloo processes on one machine (accelerate_configs/cpu2.yaml; flags TWO),
    built once: test_train's checks of DDP and test_multinode's reference."""

    def build(root):
        env = {**compare_env(root), "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, even beside a GPU
        launch = ["accelerate", "launch", "--config_file", "accelerate_configs/cpu2.yaml"]
        flags = ["--data-dir", str(phantoms), *TWO, "--output-dir", str(root / "run")]
        train("unet", *flags, env=env, launcher=launch)

    return built_once(tmp_path_factory, "two-processes", build) / "run"


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """4 phantom patients x 6 slices of 64 px in the kaggle_3m layout."""
    return write_phantoms(
        tmp_path_factory.mktemp("phantoms") / "kaggle_3m", patients=4, slices=6, size=64, seed=1
    )


@pytest.fixture
def env(tmp_path):
    """Environment for the scripts: a private cache, no inherited accelerate settings."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    e["LGG_CACHE_DIR"] = str(tmp_path / "cache")
    return e


@pytest.fixture
def no_data_env(env, tmp_path):
    """The environment of a fresh clone: the default data folder ($LGG_DATA_DIR) is not there."""
    return {**env, "LGG_DATA_DIR": str(tmp_path / "no-kaggle_3m")}


def script_module(path):
    """A script that is not in a package (a study's, beside its records) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd, env, timeout=300, process=False):
    """`cmd` from the repository root, its output captured. `python SCRIPT ...` and `python -m
    MODULE ...` run in this process (in_process): a new interpreter adds seconds of imports and
    nothing a test looks at, but for what it imports (another PYTHONPATH) and for what happens
    after the script has ended (test_contract_holds_in_a_new_process); `process=True` asks for one."""
    own = cmd[0] == sys.executable and len(cmd) > 1 and cmd[1] != "-c"
    if own and not process and env.get("PYTHONPATH") == os.environ.get("PYTHONPATH"):
        return in_process(cmd[1:], env)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(model, *args, env, launcher=()):
    """Run `<model>/train.py args` as a user would; fails the test with its output if it fails.
    Without a launcher, in this process: the script itself, as `python <model>/train.py` runs it,
    its output captured; a new interpreter would add seconds of imports and nothing else (the
    contract of a failing command, its one line and exit code, is tested with `run`)."""
    if launcher:
        p = run([*launcher, f"{model}/train.py", *args], env)
    else:
        p = in_process([f"{model}/train.py", *map(str, args)], env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="session", autouse=True)
def children_in_process():
    """The commands the tools start through common.errors.child (`python <model>/train.py ...`,
    `python -m tools.<name> ...`) run in this process too when the tool does; a launcher
    (`--launch`, accelerate) still starts its processes. The child's output is passed on, its exit
    code and its error line (LGG_ERROR_FILE, in the environment it is given) come back as from a
    process."""
    from common import errors

    real = errors.run_child

    def run_child(cmd, env):
        first, second = [*map(str, cmd[1:3]), "", ""][:2]
        ours = first.endswith(".py") or (first == "-m" and second.startswith("tools."))
        if cmd[0] != sys.executable or not ours:
            return real(cmd, env)
        p = in_process([str(c) for c in cmd[1:]], env)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        return p.returncode, []

    errors.run_child = run_child
    yield
    errors.run_child = real


def in_process(argv, env):
    """`python argv...` run here (argv: a script, or `-m` and a module): environment, working
    folder, argv and signal handlers as for a new process, restored after; Accelerate's process
    state reset (it is a per-process singleton). What the interpreter would do at the end is done
    too: a SystemExit's message, or an exception's traceback, on stderr (exit code 1)."""
    import contextlib
    import gc
    import io
    import runpy
    import signal
    import traceback
    import warnings

    from accelerate.state import AcceleratorState, GradientState

    saved = dict(os.environ), os.getcwd(), sys.argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(ROOT)
        module = argv[0] == "-m"
        sys.argv = list(argv[1:] if module else argv)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                if module:  # a module a test has imported runs again as __main__, as it should
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.argv = saved[2]
        for s, h in handlers.items():
            signal.signal(s, h)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        from common.report import console

        console.release()  # its copy in the run folder's log.txt closed, as at a process's end
        gc.collect()  # the run folder's lock and log file are closed with the run
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def real_data():
    d = os.environ.get("LGG_DATA_DIR")
    if not d:
        pytest.skip("LGG_DATA_DIR is not set: no real kaggle_3m patients to test on")
    if not Path(d).is_dir():
        pytest.skip(f"LGG_DATA_DIR={d} is not a folder")
    return Path(d)
