"""Every path a command writes, given as what it cannot be: a file where a folder goes, a folder
where a file goes, a folder under a file, a place that is read-only. Each is one line, exit 2, and
nothing is left behind. Generated from the table of the commands' output flags."""

import os
import subprocess
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
    "scaling": (["docs/studies/scaling/scaling.py", "--output-dir", "OUT"], "folder"),
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
BAD = {"folder": ("a file", "under a file", "read-only"), "file": ("a folder", "under a file", "read-only")}
CASES = [(c, bad) for c, (_, kind) in OUTPUTS.items() for bad in BAD[kind]]


def bad_path(tmp_path, bad, request):
    (tmp_path / "a-file").write_text("kept\n")
    (tmp_path / "a-folder").mkdir()
    if bad == "read-only":
        return request.getfixturevalue("read_only") / "x"
    return {
        "a file": tmp_path / "a-file",
        "a folder": tmp_path / "a-folder",
        "under a file": tmp_path / "a-file" / "x",
    }[bad]


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in, even by root (then a read-only mount); the test is skipped
    where neither can be made."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("no read-only place can be made here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.parametrize("command, bad", CASES, ids=[f"{c} {b}" for c, b in CASES])
def test_an_output_path_that_cannot_be_is_one_line(finished, tmp_path, env, command, bad, request):
    out = bad_path(tmp_path, bad, request)
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


# each command with an input of its own (a run, a data folder), given one that is not there
MISSING = [(c, given) for c, (argv, _) in OUTPUTS.items() for given in ("RUN", "DATA") if given in argv]


@pytest.mark.parametrize("command, given", MISSING, ids=[f"{c} {g}" for c, g in MISSING])
def test_a_command_that_fails_on_its_input_leaves_no_folder_it_made(finished, tmp_path, env, command, given):
    """A user error found after the output folder was made (an input that is not there, say) leaves
    no trace: not the folder, not the folders above it the command made (tools.predict left an
    empty `predictions` where it was run)."""
    argv, _ = OUTPUTS[command]
    out = tmp_path / "new" / "out"
    where = {"OUT": str(out), "RUN": str(finished / "run"), "DATA": str(finished / "kaggle_3m")}
    where[given] = str(tmp_path / "not-there")
    p = run(
        [sys.executable, *[where.get(a, a) for a in argv]], {**env, "LGG_CACHE_DIR": str(finished / "cache")}
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: "), p.stderr
    assert not (tmp_path / "new").exists(), sorted(str(f) for f in (tmp_path / "new").rglob("*"))


def test_a_failing_command_removes_what_it_made_only_where_nothing_else_was_written(tmp_path):
    """Of the folders a failing command made, one holding a run (written by a child, say) is kept
    with its record; one holding only its record or nothing is removed."""
    from common.errors import UserError, contract
    from common.folders import claim, make

    def body(argv):
        kept = claim(tmp_path / "a" / "cmp", "comparison", {"folds": 2})
        (make(kept / "unet") / "args.json").write_text("{}\n")  # what its first run wrote
        claim(tmp_path / "b" / "cmp", "comparison", {"folds": 2})
        make(tmp_path / "c" / "out")
        raise UserError("the second run's data folder is not there")

    assert contract(body, []) == 2
    assert (tmp_path / "a" / "cmp" / "folder.json").is_file()
    assert (tmp_path / "a" / "cmp" / "unet" / "args.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
