"""What a folder a command made is, and who may write into it. A run folder is known by its
args.json (common/rundir.py owns it); the folders of the commands on top (a comparison, a
cross-validation's folds, a sweep) record their kind and what defines their result in folder.json.
Every command claims its folder before it writes: a folder of another kind, or of its kind made
with other settings, is refused in one line naming the difference; one that agrees is resumed.

The runs a table puts side by side must share one recipe, but for what the preset gives each model
of its own: `recipe_of` is what a run's args.json says about how it was trained, without the model,
the paths and the speed settings."""

import json
from pathlib import Path

from common import errors, files
from common.errors import UserError

RECORD = "folder.json"
KINDS = {
    "run": "a training run (args.json)",
    "comparison": "a comparison (tools.compare)",
    "folds": "cross-validation folds (tools.folds)",
    "sweep": "a timing sweep (tools.sweep)",
}

# args.json keys that change no result: where things are, how fast, how it is run. Everything else
# (steps, precision, TTA, post-processing, phantoms, seed, split...) is part of what made a result
NOT_RECIPE = {
    *("model", "network_flags", "given", "output_dir", "resume", "checkpoint", "eval_only", "debug"),
    *("data_dir", "cache_dir", "allow_missing", "time_limit", "log_with", "no_test"),
    *("data_pipeline", "num_workers", "pin_memory", "channels_last", "compile", "sync_bn", "threads"),
    *("step_timing", "preset"),
}


def read(folder):
    """A folder's folder.json, or None (none there, or not one of ours)."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("kind") in KINDS else None


def kind_of(folder):
    """The kind of a folder: its folder.json's, or, for one made before folder.json, what its files
    say; None for an empty folder or one that is none of ours."""
    folder = Path(folder)
    if record := read(folder):
        return record["kind"]
    if (folder / "args.json").is_file():
        return "run"
    if (folder / "per-patient.csv").is_file() or (folder / "paired.json").is_file():
        return "comparison"
    if (folder / "cv.json").is_file():
        return "folds"
    if any(folder.glob("sweep-*.csv")):
        return "sweep"
    return None


def make(folder, flag="--output-dir"):
    """A folder for a command's output files, made (with its parents) now, before the work whose
    results it will hold; one line when it cannot be (a file there, a file above it, no right)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    new = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot make it ({e.strerror or e})") from e
    errors.made.extend(reversed(new))  # removed again, if empty, where the command fails
    return folder


def claim(folder, kind, identity=None, flag="--output-dir", record=True):
    """`folder` for a command of `kind`: refused if it holds another kind, or (its folder.json) the
    same kind with another value of a key of `identity`; then made, and with `record` its record
    written with `identity` (runs keep theirs in args.json). Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    found = kind_of(folder) if folder.is_dir() else None
    if found not in (None, kind):
        raise UserError(f"{flag} {folder} holds {KINDS[found]}, not {KINDS[kind]}: pick another folder")
    if kind == "run":
        return folder
    mine = read(folder) or {"kind": kind, "identity": {}}
    if not started(folder):  # a claim binds from its first run on: a failed attempt leaves none
        mine["identity"] = {}
    for key, value in (identity or {}).items():
        had = mine["identity"].get(key)
        if key in mine["identity"] and had != as_json(value):
            raise UserError(
                f"{flag} {folder} holds {KINDS[kind]} made with {key} {shown(had)}, not {shown(value)}: "
                "pick another folder (or give the same again to go on)"
            )
    if not record:
        return folder
    mine["identity"] = {**mine["identity"], **as_json(identity or {})}
    new = not (folder / RECORD).exists()
    files.write_json(make(folder, flag) / RECORD, mine)
    if new:
        errors.made.append(folder / RECORD)  # a command failing before any run leaves no record
    return folder


def started(folder):
    """Whether a run under `folder` has begun (its args.json written)."""
    return Path(folder).is_dir() and next(Path(folder).rglob("args.json"), None) is not None


def finished(run):
    """A run folder whose training has ended: a summary.json, not written by a --time-limit stop
    (the same command again resumes that one)."""
    try:
        summary = files.read_json(Path(run) / "summary.json")
    except UserError:
        return False
    return not str(summary.get("stopped_by") or "").startswith("--time-limit")


def not_finished(run):
    """Why a run folder holds no finished run, in a few words."""
    run = Path(run)
    if not (run / "args.json").is_file():
        return "not started"
    if not (run / "summary.json").is_file():
        return "failed, stopped or still running"
    try:
        files.read_json(run / "summary.json")
    except UserError:
        return "its summary.json is damaged"
    return "stopped by --time-limit"


def recipe_flags(argv):
    """The training flags of a command line without those that do not change what a run learns
    (NOT_RECIPE: paths, speed, --time-limit): what a comparison or folds folder is made with."""
    out, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name.startswith("--") and name[2:].replace("-", "_") in NOT_RECIPE:
            skip = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(token)
    return out


def recipe_of(args):
    """What an args.json says about how its run was trained (model, paths and speed left out, and
    the network flags of its own model)."""
    own = set(args.get("network_flags") or ())
    return {k: v for k, v in args.items() if k not in NOT_RECIPE and k not in own}


def same_recipe(runs, what, ignore=()):
    """One line when `runs` ({name: args.json}) were trained differently (but for `ignore`), naming
    the first flag that differs."""
    names = list(runs)
    recipes = {n: {k: v for k, v in recipe_of(runs[n]).items() if k not in ignore} for n in names}
    keys = sorted(set().union(*recipes.values()))
    for key in keys:
        values = {n: recipes[n].get(key) for n in names}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            flag = "--" + key.replace("_", "-")
            said = ", ".join(f"{n}: {shown(v)}" for n, v in values.items())
            raise UserError(
                f"{what}: the runs were trained with different {flag} ({said}): a table pairs one recipe"
            )


def model_recipes(runs, what):
    """Each model's own recipe in a table of several models ({name: args.json}, a run each): {name:
    {flag: value}} for the flags where their recipes differ. A model's own value comes from its
    table in the preset the runs share (configs/cpu.toml's [fcn]), never from a command line: runs
    that differ in a flag given to them, or made with different presets, are two commands, refused
    in one line as same_recipe refuses them."""
    recipes = {n: recipe_of(args) for n, args in runs.items()}
    differ = [
        k
        for k in sorted(set().union(*recipes.values()))
        if len({json.dumps(r.get(k), sort_keys=True) for r in recipes.values()}) > 1
    ]
    given = set().union(*(args.get("given") or () for args in runs.values()))
    presets = {args.get("preset") for args in runs.values()}
    if differ and (given & set(differ) or len(presets) > 1 or None in presets):
        same_recipe(runs, what)
    return {n: {"--" + k.replace("_", "-"): recipes[n].get(k) for k in differ} for n in runs}


def as_json(value):
    return json.loads(json.dumps(value, default=str))


def shown(value):
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)
