"""A model is its folder: a fourth one, added to a copy of the repository with no other edit, is
trained, evaluated, predicted with, benchmarked and run by the Slurm script's array."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

from common import registry

MODEL = """import torch.nn as nn

from common.blocks import scaled


class Tiny(nn.Module):
    def __init__(self, width=1.0):
        super().__init__()
        c = scaled(32, width)
        self.net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 1, 1))

    def forward(self, x):
        return self.net(x)
"""
TRAIN = '''"""Train a two-layer test network."""
from common.cli import make_parser
from common.entry import main
from tiny.model import Tiny


def build_model(args):
    return Tiny(width=args.width)


def parser():
    return make_parser(__file__, __doc__)


if __name__ == "__main__":
    main(parser(), build_model)
'''


@pytest.mark.parametrize("name", registry.names())
def test_every_model_meets_the_contract(name):
    registry.check(registry.build({"model": name, "width": 0.125, "image_size": 64}))


def test_the_contract_check_fails_a_model_that_breaks_it():
    import torch.nn as nn

    with pytest.raises(AssertionError, match="one tensor"):
        registry.check(nn.Conv2d(3, 2, 1))  # two channels out


@pytest.fixture(scope="session")
def copy(tmp_path_factory, phantoms):
    root = tmp_path_factory.mktemp("repo") / "lgg-seg"
    shutil.copytree(
        ROOT, root, ignore=shutil.ignore_patterns(".*", "data", "runs", "docs", "__pycache__", "*.egg-info")
    )
    (root / "tiny").mkdir()
    (root / "tiny" / "__init__.py").write_text("")
    (root / "tiny" / "model.py").write_text(MODEL)
    (root / "tiny" / "train.py").write_text(TRAIN)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")},
        "PYTHONPATH": str(root),
        "LGG_CACHE_DIR": str(root.parent / "cache"),
    }
    return root, env, phantoms


def sh(cmd, root, env):
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.mark.slow
def test_a_fourth_model_folder_is_all_it_takes(copy):
    root, env, data = copy
    py = sys.executable
    out = root.parent / "run"
    sh([py, "tiny/train.py", "--data-dir", str(data), *TINY, "--output-dir", str(out)], root, env)
    assert json.loads((out / "summary.json").read_text())["model"] == "tiny"
    sh(
        [
            py,
            "tiny/train.py",
            "--data-dir",
            str(data),
            "--eval-only",
            "--checkpoint",
            str(out),
            "--output-dir",
            str(root.parent / "eval"),
        ],
        root,
        env,
    )
    assert json.loads((root.parent / "eval" / "eval.json").read_text())["test"]["slices"] > 0
    patient = next(p for p in data.iterdir() if p.is_dir())
    sh(
        [
            py,
            "-m",
            "tools.predict",
            "--checkpoint",
            str(out),
            "--data-dir",
            str(patient),
            "--output-dir",
            str(root.parent / "pred"),
            "--no-figures",
        ],
        root,
        env,
    )
    assert list((root.parent / "pred" / "tiny" / "masks").glob("*_pred.tif"))
    p = sh(
        [
            py,
            "-m",
            "tools.bench",
            "step",
            "--data-dir",
            str(data),
            "--models",
            "tiny",
            "--width",
            "0.125",
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--batches",
            "2",
            "--pipelines",
            "cached",
            "--output-dir",
            str(root.parent / "bench"),
        ],
        root,
        env,
    )
    assert "tiny" in p.stdout
    sh(
        [
            "bash",
            "run.sh",
            "unet,tiny",
            "--data-dir",
            str(data),
            *TINY,
            "--output-dir",
            str(root.parent / "cmp"),
        ],
        root,
        {**env, "SLURM_ARRAY_TASK_ID": "1"},
    )
    assert (root.parent / "cmp" / "tiny" / "summary.json").exists()
    assert not (root.parent / "cmp" / "unet").exists()


def test_a_script_runs_the_code_beside_it_not_the_installed_checkout(copy):
    root, env, _ = copy
    cli = root / "common" / "cli.py"
    cli.write_text(cli.read_text().replace("DataLoader workers per process", "WORKERS OF THE COPY"))
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the installed checkout is another one
    p = sh([sys.executable, str(root / "unet" / "train.py"), "--help"], root.parent, bare)
    assert "WORKERS OF THE COPY" in p.stdout
