"""Every flag of every command, checked where it is parsed (common/ranges.py): the boundary values
of each numeric flag are derived from its declaration, and every value either parses to a number
its rule allows or is refused in one line naming the flag (exit 2 through common.errors.contract).
Nothing here is written case by case: a flag added tomorrow is tested by the same table."""

import argparse
import importlib
import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, script_module

from common import cli, registry
from common.errors import UserError
from common.ranges import Range

TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__")
# the studies' own scripts: each a command with flags (parser() and main(), as the tools)
STUDY_SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "studies").glob("*/*.py"))


def commands():
    """(name, parser, parse): every train.py and every tool; the pack tool once per sub-command."""
    out = []
    for model in registry.names():
        p = registry.script(model).parser()
        out.append((f"{model}/train.py", p, lambda argv, p=p: cli.parse(p, ["--synthetic", *argv])))
    modules = [(f"tools.{n}", importlib.import_module(f"tools.{n}")) for n in TOOLS]
    modules += [(path, script_module(ROOT / path)) for path in STUDY_SCRIPTS]
    for name, module in modules:
        p = module.parser()
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for sub, sp in subs[0].choices.items() if subs else [(None, p)]:
            head = [sub] if sub else []
            out.append((" ".join([name, *head]), sp, lambda argv, p=p, h=head, sp=sp: p.parse_args(
                [*h, *required(sp), *argv])))  # fmt: skip
    return out


def required(p):
    """The least a parser needs: each positional and required flag with its first choice, or "x"."""
    argv = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction) or not (a.required or not a.option_strings):
            continue
        if a.dest == "help":
            continue
        value = str(next(iter(a.choices))) if a.choices else "x"
        argv += [value] if not a.option_strings else [a.option_strings[0], value]
    return argv


def options(p):
    return [a for a in p._actions if a.option_strings and a.nargs != 0 and a.dest != "help"]


COMMANDS = commands()
FLAGS = [(name, a.option_strings[-1], a, parse) for name, p, parse in COMMANDS for a in options(p)]
NUMERIC = [f for f in FLAGS if isinstance(f[2].type, Range)]


def boundary(r):
    """Values either side of each edge of a Range, and the usual hostile ones."""
    step = 1 if r.kind is int else 0.5
    near = [e + d for e in r.edges for d in (-step, 0, step)]
    return [str(v) for v in near] + ["-1", "0", "1e12", str(10**12), "", "abc", "nan", "inf", "-inf", "1.5"]


def test_every_parser_keeps_the_contract():
    """argparse's own errors (a missing argument, a bad choice) are UserErrors, not usage and exit 2."""
    for name, p, _ in COMMANDS:
        assert isinstance(p, cli.Parser), f"{name}: {type(p).__name__}, not common.cli.Parser"


def ids(flags):
    return [f"{name} {flag}" for name, flag, *_ in flags]


@pytest.mark.parametrize("name, flag, action", [(n, f, a) for n, f, a, _ in FLAGS], ids=ids(FLAGS))
def test_every_numeric_and_path_flag_declares_its_range(name, flag, action):
    assert action.type not in (int, float, Path), (
        f"{name} {flag}: type={action.type.__name__}, not a common.ranges type"
    )


@pytest.mark.parametrize("name, flag, action, parse", NUMERIC, ids=ids(NUMERIC))
def test_a_numeric_flag_takes_what_its_rule_allows_and_refuses_the_rest_in_one_line(
    name, flag, action, parse
):
    r = action.type
    for text in boundary(r):
        try:
            r(text)
            allowed = True
        except argparse.ArgumentTypeError:
            allowed = False
        try:
            args = parse([f"{flag}={text}"])
        except UserError as e:
            line = str(e)
            assert "\n" not in line and line.startswith("argument ") and flag in line.split(":")[0], (
                name,
                text,
                line,
            )
            assert allowed or line.startswith(f"argument {flag}: {r.rule}") or "expected" in line, (
                name,
                text,
                line,
            )
            continue  # allowed by the flag's rule, refused in combination with the others (named)
        assert allowed, f"{name} {flag}={text!r} accepted against its rule: {r.rule}"
        value = getattr(args, action.dest)
        assert (value[0] if isinstance(value, list) else value) == r(text)


@pytest.mark.parametrize("name, flag, action, parse", FLAGS, ids=ids(FLAGS))
def test_any_flag_given_garbage_is_taken_or_refused_in_one_line(name, flag, action, parse):
    for text in ("", "-", "abc", "\x00", "9" * 400):
        try:
            parse([f"{flag}={text}"])
        except UserError as e:
            assert "\n" not in str(e), (name, flag, text, str(e))


def test_a_models_own_preset_values_win_over_the_shared_ones_and_flags_over_both(tmp_path):
    """A recipe is a file: shared keys, then a [model] table of that model's own values; flags given
    on the command line win over both."""
    from common.cli import make_parser, parse, preset_values

    script = tmp_path / "mymodel" / "train.py"
    p = make_parser(str(script), "a model")
    recipe = tmp_path / "mine.toml"
    recipe.write_text('width = 0.25\nlr = 1e-3\nchannels-last = true\n[mymodel]\nlr = 3e-4\nloss = "dice"\n'
                      '[othermodel]\nlr = 1\n')  # fmt: skip
    args = parse(p, ["--synthetic", "--preset", str(recipe)])
    assert (args.model, args.lr, args.loss, args.width, args.channels_last) == (
        "mymodel",
        3e-4,
        "dice",
        0.25,
        True,
    )
    assert parse(p, ["--synthetic", "--preset", str(recipe), "--lr", "1e-2"]).lr == 1e-2
    assert (
        preset_values(make_parser(str(tmp_path / "othermodel" / "train.py"), "another"), str(recipe))["lr"]
        == 1
    )
    cpu = preset_values(p, "cpu")  # the shipped recipe, read as flags
    assert cpu["image_size"] == 128 and cpu["tumour_share"] == 0.5


@pytest.mark.parametrize(
    "text, said",
    [
        ("lr = 0\n", "--preset {}: argument --lr"),
        ("learning-rate = 1\n", "--preset {}: unrecognized arguments: --learning-rate"),
        ("lr = \n", "--preset {}: not a TOML file"),
        (None, "argument --preset: no recipe {}"),
    ],
)
def test_a_recipe_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, text, said):
    from common.cli import parse
    from unet.train import parser

    recipe = tmp_path / "r.toml"
    if text is not None:
        recipe.write_text(text)
    with pytest.raises(UserError) as e:
        parse(parser(), ["--synthetic", "--preset", str(recipe)])
    assert str(e.value).startswith(said.format(recipe)) and "\n" not in str(e.value), str(e.value)


def test_an_error_about_a_value_the_preset_set_says_so():
    """`--preset cpu` then an error about --tumour-share, a flag the user never typed: named with its
    value and source; a flag the user gave is named plainly."""
    from common.cli import named, parse
    from common.data import TumourShare
    from common.errors import UserError
    from unet.train import parser

    args = parse(parser(), ["--synthetic", "--preset", "cpu"])
    with pytest.raises(UserError, match=r"^--tumour-share 0.5 \(of --preset cpu\): the training slices"):
        TumourShare([5, 3], args.tumour_share, 0, named(args, "tumour_share"))
    given = parse(parser(), ["--synthetic", "--preset", "cpu", "--tumour-share", "0.4"])
    assert named(given, "tumour_share") == "--tumour-share"


# each model's chosen run of docs/studies/per-model (bold in its README)
CHOSEN = {
    "unet": "unet-lr1e-3-flair0.2",
    "fcn": "fcn-lr3e-4-e24-flair0.2",
    "segnet": "segnet-prior-lr1e-3-flair0.2",
}
# what the study's runs set that the preset does not: where they read and wrote, their split
STUDY_ONLY = {"data_dir", "cache_dir", "output_dir", "given", "network_flags", "synthetic", "threads"}
STUDY_ONLY |= {"folds", "fold", "test_fold", "val_frac", "no_test"}


@pytest.mark.parametrize("model", sorted(CHOSEN))
def test_the_cpu_preset_trains_each_model_as_its_chosen_study_run_trained(model):
    """Every flag of the chosen run's args.json, but where it wrote and which patients it held out, is
    what `--preset cpu` gives that model: no choice of the study left out of the preset, none added."""
    from common.cli import make_parser, parse

    chosen = json.loads((ROOT / "docs/studies/per-model" / CHOSEN[model] / "args.json").read_text())
    args = vars(parse(make_parser(str(ROOT / model / "train.py"), model), ["--synthetic", "--preset", "cpu"]))
    differ = {k: (args.get(k), v) for k, v in chosen.items() if k not in STUDY_ONLY and args.get(k) != v}
    assert not differ, differ
    assert f"**`{CHOSEN[model]}`**" in (ROOT / "docs/studies/per-model/README.md").read_text()


@pytest.mark.parametrize("model", ["unet", "fcn", "segnet"])
def test_the_cpu_preset_gives_each_model_the_recipe_its_validation_study_chose(model):
    """configs/cpu.toml holds each model's winner of docs/studies/per-model (the highest mean Dice per
    patient on validation patients among <model>-lr<rate>[-dice]): the study and the recipe agree."""
    import csv

    from common.cli import make_parser, parse

    rows = list(csv.DictReader((ROOT / "docs/studies/per-model" / model / "recipe-val.csv").open()))
    variants = [r for r in rows if re.fullmatch(rf"{model}-lr[0-9.e-]+?(-dice)?", r["variant"])]
    best = max(variants, key=lambda r: float(r["dice_patient_mean"]))["variant"]
    args = parse(make_parser(str(ROOT / model / "train.py"), model), ["--synthetic", "--preset", "cpu"])
    lr = best.removeprefix(f"{model}-lr").removesuffix("-dice")
    assert (args.lr, args.loss) == (float(lr), "dice" if best.endswith("-dice") else "bce+dice"), best
