"""Every result the project writes is written whole or not at all: to a temporary name renamed over
the old file (common.files.replace), or into a temporary folder renamed whole. Checked on the source
of every module (a write added tomorrow is checked too), and on the helper under a full disk."""

import ast
import errno

import pytest
from conftest import ROOT

from common import files
from common.errors import UserError

WRITES = {"write_text", "write_bytes", "savefig", "save", "savez_compressed", "savez"}

# writes that are not results, each with why
ALLOWED = {
    ("common/rundir.py", "open"): "the run folder's lock file, which holds nothing",
    ("common/entry.py", "open"): "the error line appended to the file run.sh reads after the job",
    ("common/files.py", "open"): "append_jsonl: an append-only log, whose torn last line read_jsonl drops",
    ("common/report.py", "open"): "log.txt, the console's copy, appended a line at a time as it prints",
    ("common/synthetic.py", "save"): "the phantoms, into a temporary folder renamed whole (ensure_phantoms)",
    (
        "tools/export.py",
        "save",
    ): "the exported model, to the temporary name export_checked renames once checked",
}


def writes(path):
    """(name of the call, source of its target) of each call in a module that writes a file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in WRITES and ast.unparse(f.value) != "files":
            target = ast.unparse(f.value) + " " + " ".join(ast.unparse(a) for a in node.args)
            yield f.attr, target, node.lineno
        elif isinstance(f, ast.Name) and f.id == "open" and len(node.args) > 1:
            mode = ast.unparse(node.args[1])
            if any(c in mode for c in "wax"):
                yield "open", ast.unparse(node.args[0]), node.lineno


def test_every_write_goes_to_a_temporary_name():
    wrong = []
    for path in sorted([*ROOT.glob("common/*.py"), *ROOT.glob("tools/*.py")]):
        name = str(path.relative_to(ROOT))
        for call, target, line in writes(path):
            if "tmp" in target or "buffer" in target or (name, call) in ALLOWED:
                continue
            wrong.append(f"{name}:{line}: {call} to {target}")
    assert not wrong, "write through common.files.replace (or to a temporary, renamed): " + "; ".join(wrong)


@pytest.mark.parametrize("how", ["full disk", "interrupted"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, how):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def write(tmp):
        tmp.write_text("half")
        if how == "full disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    with pytest.raises(UserError if how == "full disk" else KeyboardInterrupt) as e:
        files.replace(path, write)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    if how == "full disk":
        assert str(e.value) == f"cannot write {path} (the previous one is intact): No space left on device"


def test_a_torn_last_line_of_a_log_is_dropped_and_a_damaged_one_before_it_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert files.read_jsonl(log) == [{"epoch": 1}, {"epoch": 2}]
    log.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(UserError, match="metrics.jsonl: line 2 is not a row"):
        files.read_jsonl(log)
