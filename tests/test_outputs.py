"""Every path a command writes, given as what it cannot be: a file where a folder goes, a folder
where a file goes, a folder under a file. Each is one line, exit 2, and nothing is left behind.
Generated from the table of the commands' output flags."""

import sys

import pytest
from conftest import TINY, run

ONE = [*TINY, "--epochs", "1"]

# command -> (argv with OUT for the path, and RUN / DATA for a finished run and its data; what OUT is)
OUTPUTS = {
    "train.py": (["unet/train.py", "--data-dir", "DATA", *ONE, "--output-dir", "OUT"], "folder"),
    "compare": (
        ["-m", "tools.compare", "--models", "unet", "--output-dir", "OUT", "--", "--data-dir", "DATA", *ONE],
        "folder",
    ),  # fmt: skip
    "folds": (
        [
            "-m",
            "tools.folds",
            "unet",
            "--folds",
            "2",
            "--output-dir",
            "OUT",
            "--",
            "--data-dir",
            "DATA",
            *ONE,
        ],
        "folder",
    ),  # fmt: skip
    "predict": (
        ["-m", "tools.predict", "--checkpoint", "RUN", "--data-dir", "DATA", "--output-dir", "OUT"],
        "folder",
    ),
    "results": (["-m", "tools.results", "RUN", "--output-dir", "OUT"], "folder"),
    "scaling": (["-m", "tools.scaling", "--output-dir", "OUT"], "folder"),
    "sweep": (["-m", "tools.sweep", "unet", "--output-dir", "OUT", "--", "--synthetic"], "folder"),
    "bench": (
        [
            "-m",
            "tools.bench",
            "data",
            "--data-dir",
            "DATA",
            "--image-size",
            "64",
            "--batch-size",
            "2",
            "--pipelines",
            "cached",
            "--workers",
            "0",
            "--warmup",
            "0",
            "--batches",
            "1",
            "--output-dir",
            "OUT",
        ],
        "folder",
    ),  # fmt: skip
    "export": (
        ["-m", "tools.export", "--checkpoint", "RUN", "--format", "torchscript", "--output", "OUT"],
        "file",
    ),
    "pack": (
        ["-m", "tools.pack", "pack", "--data-dir", "DATA", "--image-size", "64", "--out", "OUT"],
        "file",
    ),
}
BAD = {"folder": ("a file", "under a file"), "file": ("a folder", "under a file")}
CASES = [(c, bad) for c, (_, kind) in OUTPUTS.items() for bad in BAD[kind]]


def bad_path(tmp_path, bad):
    (tmp_path / "a-file").write_text("kept\n")
    (tmp_path / "a-folder").mkdir()
    return {
        "a file": tmp_path / "a-file",
        "a folder": tmp_path / "a-folder",
        "under a file": tmp_path / "a-file" / "x",
    }[bad]


@pytest.mark.parametrize("command, bad", CASES, ids=[f"{c} {b}" for c, b in CASES])
def test_an_output_path_that_cannot_be_is_one_line(finished, tmp_path, env, command, bad):
    out = bad_path(tmp_path, bad)
    argv, _ = OUTPUTS[command]
    where = {"OUT": str(out), "RUN": str(finished / "run"), "DATA": str(finished / "kaggle_3m")}
    p = run(
        [sys.executable, *[where.get(a, a) for a in argv]], {**env, "LGG_CACHE_DIR": str(finished / "cache")}
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        p.stdout[-2000:] + p.stderr
    )
    assert (tmp_path / "a-file").read_text() == "kept\n" and not list((tmp_path / "a-folder").iterdir())
