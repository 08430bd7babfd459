"""The library's layers: each module imports only from layers below its own (or its own layer, with
no circle); models and tools sit on top."""

import ast
import re

from conftest import ROOT

# a module's layer: higher numbers may import lower ones, never the reverse
LAYERS = {
    "tools": 7,
    "models": 7,
    "common.entry": 6,
    "common.comparison_cv": 6,
    "common.comparison": 5,
    "common.inference": 4,
    "common.loop": 5,
    "common.summary": 4,
    "common.evaluate": 4,
    "common.resolve": 3,
    "common.rundir": 3,
    "common.prepare": 3,
    "common.registry": 3,
    "common.checkpoint": 2,
    "common.folders": 2,
    "common.jobs": 1,
    "common.distributed": 2,
    "common.cli": 2,
    "common.split": 1,
    "common.cache": 1,
    "common.data": 1,
    "common.pack": 0,
    "common.synthetic": 1,
    "common.report": 1,
    "common.files": 1,
    "common.loss": 0,
    "common.metrics": 0,
    "common.stats": 0,
    "common.timing": 0,
    "common.blocks": 0,
    "common.errors": 0,
    "common.ranges": 0,
    "common.pipelines": 0,
}


def layer(module):
    if module.startswith("tools"):
        return LAYERS["tools"]
    if not module.startswith("common"):
        return LAYERS["models"]
    return LAYERS[module]


OURS = ("common", "tools")


def project_imports():
    """{module: set of project modules it imports}, for common/, tools/ and the model folders."""
    graph = {}
    for path in [*ROOT.glob("common/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("*/train.py")]:
        if path.stem == "__init__":
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                if node.module in OURS:
                    found |= {f"{node.module}.{a.name}" for a in node.names}
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] in OURS and "." in a.name}
        graph[name] = found
    return graph


def test_every_library_module_has_a_layer():
    assert {m for m in project_imports() if m.startswith("common.")} <= set(LAYERS)


def test_no_import_goes_up():
    wrong = [f"{m} -> {d}" for m, deps in project_imports().items() for d in deps if layer(d) > layer(m)]
    assert not wrong, wrong


def test_no_tool_imports_another_tool():
    """tools/ holds commands only: what two of them share is a library module in common/."""
    wrong = [f"{m} -> {d}" for m, deps in project_imports().items() for d in deps
             if m.startswith("tools.") and d.startswith("tools.")]  # fmt: skip
    assert not wrong, wrong


def test_no_import_circle():
    graph = project_imports()

    def reaches(start, target, seen):
        return any(
            d == target or (d not in seen and reaches(d, target, seen | {d})) for d in graph.get(start, ())
        )

    assert not [m for m in graph if reaches(m, m, {m})]


def test_one_owner_of_the_run_folders_layout():
    """Only common/jobs.py spells where a fold's run lives (run.sh asks it, tools use run_folder)."""
    sources = [*ROOT.glob("common/*.py"), *ROOT.glob("tools/*.py"), ROOT / "run.sh"]
    spelt = re.compile(r"fold-[{$]")  # f"fold-{k}" in Python, fold-$k in bash
    wrong = [str(p.relative_to(ROOT)) for p in sources if p.name != "jobs.py" and spelt.search(p.read_text())]
    assert not wrong, wrong


def test_nothing_sets_a_flag_of_a_run_after_its_flags_are_resolved():
    """Outside common/resolve.py (and rundir.starting_point, which it calls, and cli's parse), no
    library module assigns to args: what a run uses is known before it starts."""
    assign = re.compile(r"\bargs\.\w+ = |setattr\(args,")
    allowed = {"resolve.py", "cli.py", "rundir.py"}
    wrong = [f"{p.name}:{n}" for p in ROOT.glob("common/*.py") if p.name not in allowed
             for n, line in enumerate(p.read_text().splitlines(), 1) if assign.search(line)]  # fmt: skip
    assert not wrong, wrong


def test_every_function_fits_on_a_screen():
    """At most 60 lines a function in the library, the tools and the models' scripts."""
    long = []
    for path in [*ROOT.glob("common/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("*/train.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long


def test_help_shows_the_flags_a_user_sets_per_run():
    """About 30 flags in a train.py's --help; the recipe's, benchmarks' and the original protocol's
    behind --help-all (every flag still parses)."""
    from unet.train import parser

    shown = [line for line in parser().format_help().splitlines() if line.startswith("  -")]
    assert 25 <= len(shown) <= 34, len(shown)
