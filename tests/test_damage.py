"""Every file the project writes and reads back, damaged every way, under every command that reads
it: the command recovers (exit 0) or says so in one line (`error: ...`), never a traceback.
Generated from two tables (the files and who reads them; the kinds of damage), not case by case:
a reader or a file added to the tables is tested under every damage."""

import dataclasses
import shutil
import sys

import numpy as np
import pytest
from conftest import ROOT, run

from common import cache
from tools.pack import write_pack

DAMAGES = {
    "empty": lambda f: f.write_bytes(b""),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)]),
    "garbage": lambda f: f.write_bytes(b"\x00\xff\xfe not a file of ours \x80" * 8),
    "of another kind": lambda f: f.write_text('[1, "two", {"three": 3}]\n'),
    "missing": lambda f: f.unlink(),
}

# the commands that read a finished run folder RUN (its data: DATA)
READERS = {
    "resume": lambda run, data: ["unet/train.py", "--resume", run, "--data-dir", data],
    "eval-only": lambda run, data: [
        "unet/train.py",
        "--eval-only",
        "--checkpoint",
        run,
        "--data-dir",
        data,
        "--output-dir",
        run + "-eval",
    ],  # fmt: skip
    "predict": lambda run, data: [
        "-m",
        "tools.predict",
        "--checkpoint",
        run,
        "--data-dir",
        data,
        "--patients",
        "test",
        "--output-dir",
        run + "-predictions",
    ],  # fmt: skip
    "results": lambda run, data: ["-m", "tools.results", run, "--output-dir", run + "-results"],
}

# each file of a run folder, and the commands that read it
FILES = {
    "args.json": ["resume", "eval-only", "predict", "results"],
    "split.json": ["resume", "eval-only", "predict"],
    "metrics.jsonl": ["resume", "results"],
    "summary.json": ["resume", "results"],
    "best.pt": ["eval-only", "predict"],
    "last/model.safetensors": ["resume"],
    "last/random_states_0.pkl": ["resume"],
}

CASES = [(f, d, r) for f, readers in FILES.items() for d in DAMAGES for r in readers]

# the folders of the tools: (folder, file in it, command reading it); FOLDER is a damaged copy
TOOLS = {
    "comparison": [
        ("folder.json", ["-m", "tools.compare", "--table", "--output-dir", "FOLDER"]),
        ("unet/summary.json", ["-m", "tools.compare", "--table", "--output-dir", "FOLDER"]),
        ("unet/split.json", ["-m", "tools.compare", "--table", "--output-dir", "FOLDER"]),
        ("fcn/args.json", ["-m", "tools.compare", "--table", "--output-dir", "FOLDER"]),
        (
            "per-patient.csv",
            ["-m", "tools.compare", "--table", "--output-dir", "INTACT", "--versus", "FOLDER"],
        ),
    ],
    "sweep": [
        (
            "sweep-unet.csv",
            ["-m", "tools.results", "--sweep", "FOLDER/sweep-unet.csv", "--output-dir", "FOLDER"],
        )
    ],
    "pack": [
        ("p.pack", ["-m", "tools.pack", "unpack", "FOLDER/p.pack", "--image-size", "64"]),
        ("p.pack.part1", ["-m", "tools.pack", "unpack", "FOLDER/p.pack", "--image-size", "64"]),
    ],
    "cross-validated": [
        (
            f"unet/fold-0/{f}",
            [
                "-m",
                "tools.compare",
                "--table",
                "--folds",
                "2",
                "--models",
                "unet,fcn",
                "--output-dir",
                "FOLDER",
            ],
        )
        for f in ("summary.json", "args.json", "split.json")
    ],  # fmt: skip
}
TOOL_CASES = [(k, f, d, cmd) for k, files in TOOLS.items() for f, cmd in files for d in DAMAGES]


@pytest.fixture(scope="session")
def folders(tmp_path_factory, comparison, cross_validated, finished):
    """An intact folder of each kind of TOOLS, and the environment to read it."""
    root = tmp_path_factory.mktemp("tool-folders")
    cmp, env = comparison
    (root / "sweep").mkdir()
    shutil.copy(ROOT / "docs" / "studies" / "speed" / "sweep-unet.csv", root / "sweep")
    pack = root / "pack" / "p.pack"  # its folder made by write_pack
    write_pack(finished / "kaggle_3m", pack, finished / "cache", size=64, part_size=20_000, progress=False)
    kinds = {"comparison": cmp, "sweep": root / "sweep", "pack": root / "pack"}
    return {**kinds, "cross-validated": cross_validated[0]}, env


@pytest.mark.parametrize(
    "kind, name, damage, cmd", TOOL_CASES, ids=[f"{k} {f} {d}" for k, f, d, _ in TOOL_CASES]
)
def test_a_damaged_file_of_a_tools_folder_is_recovered_or_said_in_one_line(
    folders, tmp_path, kind, name, damage, cmd
):
    intact, env = folders
    folder = tmp_path / kind
    shutil.copytree(intact[kind], folder)
    (tmp_path / "intact").symlink_to(intact[kind])
    DAMAGES[damage](folder / name)
    argv = [a.replace("FOLDER", str(folder)).replace("INTACT", str(tmp_path / "intact")) for a in cmd]
    said(run([sys.executable, *argv], {**env, "LGG_CACHE_DIR": str(tmp_path / "cache")}))


def said(p):
    """Recovered (exit 0), or one line: never a traceback."""
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if p.returncode != 0:
        assert p.returncode in (1, 2) and lines and lines[-1].startswith("error: "), (
            p.stdout[-2000:] + p.stderr
        )


@pytest.mark.parametrize("name, damage, reader", CASES, ids=[f"{f} {d} {r}" for f, d, r in CASES])
def test_a_damaged_file_is_recovered_or_said_in_one_line(finished, tmp_path, env, name, damage, reader):
    folder = tmp_path / "run"
    shutil.copytree(finished / "run", folder)
    env = {**env, "LGG_CACHE_DIR": str(finished / "cache")}
    DAMAGES[damage](folder / name)
    p = run([sys.executable, *READERS[reader](str(folder), str(finished / "kaggle_3m"))], env)
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if p.returncode != 0:
        assert p.returncode in (1, 2) and lines and lines[-1].startswith("error: "), (
            p.stdout[-2000:] + p.stderr
        )


# the files of a cache folder (one of a kaggle_3m folder, one of a pack), each read by every run
CACHED = [*(f"{name}.npy" for name in cache.CACHE_FILES), "meta.json"]
CACHE_CASES = [(src, f, d) for src in ("folder", "pack") for f in CACHED + ["index.json"] * (src == "pack")
               for d in DAMAGES]  # fmt: skip


@pytest.mark.parametrize("source, name, damage", CACHE_CASES, ids=[" ".join(c) for c in CACHE_CASES])
def test_a_cache_damaged_after_it_was_complete_is_built_again(phantoms, tmp_path, source, name, damage):
    data = phantoms
    if source == "pack":
        data = tmp_path / "p.pack"
        write_pack(phantoms, data, tmp_path / "cache", size=64, part_size=20_000, progress=False)
    slices, intact = cache.open_dataset(data, tmp_path / "cache", 32)
    expected = [np.array(a) for a in dataclasses.astuple(intact)]
    (folder,) = [f for f in (tmp_path / "cache").glob("lgg-32px-*") if f.is_dir()]
    DAMAGES[damage](folder / name)
    again, reopened = cache.open_dataset(data, tmp_path / "cache", 32)
    again_arrays = dataclasses.astuple(reopened)
    assert again == slices and all(np.array_equal(a, b) for a, b in zip(expected, again_arrays))
