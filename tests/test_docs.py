"""The documentation points at what exists: every relative link of README.md and docs/, and every
test file or test it names (`tests/test_x.py::test_y`, or as the fault matrix does, `x::y...`, the
start of a test's name), and every Dice interval it quotes (a committed table's)."""

import csv
import re

from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s#]+)(#[^)]*)?\)")
TEST_REF = re.compile(r"tests/(test_\w+\.py)(?:::(\w+))?")
MATRIX_REF = re.compile(r"`(\w+)::(\w+)")  # the fault matrix's `data::bad_data_is` (a name's start)


def pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("*/README.md"))]


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target, _ in LINK.findall(page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_test_the_docs_name_exists():
    missing = []
    for page in pages():
        text = page.read_text()
        named = TEST_REF.findall(text) + [(f"test_{m}.py", f"test_{t}") for m, t in MATRIX_REF.findall(text)]
        for name, test in named:
            path = ROOT / "tests" / name
            if not path.is_file() or (test and f"def {test}" not in path.read_text()):
                missing.append(f"{page.relative_to(ROOT)} -> tests/{name}{'::' + test if test else ''}")
    assert not missing, missing


INTERVAL = re.compile(r"\b(0\.\d{3})(?:\*\*)? (\[0\.\d{3}, 0\.\d{3}\])")  # "**0.787** [0.720, 0.845]"


def test_every_interval_the_docs_quote_is_in_a_committed_table():
    """A Dice quoted with its interval is a row of a CSV committed under docs/, not typed by hand."""
    tables = sorted((ROOT / "docs").rglob("*.csv"))
    rows = [r for f in tables for r in csv.DictReader(f.read_text().splitlines())]
    committed = {
        f"{float(r[k]):.3f} [{float(r[k + '_ci_low']):.3f}, {float(r[k + '_ci_high']):.3f}]"
        for r in rows
        for k in ("dice_patient_mean", "dice_patient_median")
        if r.get(k) and r.get(k + "_ci_low")
    }
    quoted = {
        (p.relative_to(ROOT), f"{m} {ci}") for p in pages() for m, ci in INTERVAL.findall(p.read_text())
    }
    assert len(quoted) > 20  # the pattern still finds what the pages quote
    assert not [q for q in quoted if q[1] not in committed]
