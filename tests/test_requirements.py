"""What the code imports is what requirements.txt installs, and pyproject.toml declares the same."""

import ast
import importlib.metadata
import re
import sys

import tomllib
from conftest import ROOT

# the repository's own packages, and the test modules (which import each other's fixtures)
OWN = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("tests/*.py")}


def names(lines):
    """Normalised distribution names of requirement lines (comments, options and `-e .` left out)."""
    found = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            found.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return found


def requirements():
    return names((ROOT / "requirements.txt").read_text().splitlines())


def imported_modules():
    """Top-level module of every import in the repository's own Python files -> a file importing it."""
    modules = {}
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "site-packages" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                modules.setdefault(top, str(rel))
    return modules


def test_every_third_party_import_is_in_requirements():
    provided = importlib.metadata.packages_distributions()
    listed, missing = requirements(), []
    for module, where in imported_modules().items():
        if module in sys.stdlib_module_names or module in OWN:
            continue
        dists = {d.lower().replace("_", "-") for d in provided.get(module, [])}
        if not dists & listed:
            missing.append(f"{module} (imported in {where}; installed by {sorted(dists) or 'nothing here'})")
    assert not missing, "imported but not in requirements.txt: " + "; ".join(missing)


def test_the_check_sees_a_missing_requirement():
    # the reason for this file: scipy was imported and never listed
    assert "scipy" in imported_modules()
    assert "scipy" in requirements() and "scipy" not in names(["numpy", "torch==2.14.1  # scipy"])


def test_pyproject_declares_what_requirements_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]
    listed = {
        s
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if (s := line.split("#")[0].strip()) and not s.startswith("-")
    }
    assert set(declared) == listed  # the same names with the same version specifiers
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= listed
