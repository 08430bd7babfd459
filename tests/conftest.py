import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.synthetic import write_phantoms

ROOT = Path(__file__).resolve().parents[1]
# a tiny model on tiny phantoms: each run takes seconds on a CPU
TINY = ["--image-size", "64", "--width", "0.125", "--epochs", "2", "--batch-size", "4"]


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


def run(cmd, env, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(model, *args, env, launcher=()):
    """Run `<model>/train.py args` as a user would; fails the test with its output if it fails."""
    p = run([*launcher, *([] if launcher else [sys.executable]), f"{model}/train.py", *args], env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="session")
def real_data():
    d = os.environ.get("LGG_DATA_DIR")
    if not d:
        pytest.skip("LGG_DATA_DIR is not set: no real kaggle_3m patients to test on")
    if not Path(d).is_dir():
        pytest.skip(f"LGG_DATA_DIR={d} is not a folder")
    return Path(d)
