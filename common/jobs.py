"""Where each run of a comparison or a cross-validation lives, and which run a Slurm array task is:
one owner of that layout, for tools.compare, tools.folds and run.sh (which asks `python -m
common.jobs`, so that bash parses no training flag).

    comparison:                  OUT/<model>             (tools.compare; an array over models)
    cross-validated comparison:  OUT/<model>/fold-<k>    (tools.compare --folds; over models x folds)
    cross-validation:            OUT/fold-<k>            (tools.folds; an array over one model's folds)
"""

import os
import shlex
import sys
from pathlib import Path

from common.errors import UserError, contract

ROOT = Path(__file__).resolve().parents[1]


def run_folder(out, model=None, fold=None):
    """A run's folder in a comparison (`model`), a cross-validation (`fold`) or both."""
    out = Path(out) / model if model else Path(out)
    return out if fold is None else out / f"fold-{fold}"


def value_of(name, argv):
    """The value of flag `name` in argv (--flag V or --flag=V; the last one wins), or None."""
    found = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def models_here():
    return sorted(p.parent.name for p in ROOT.glob("*/train.py") if (p.parent / "model.py").is_file())


def plan(spec, argv, task=None, job=None, array_job=None):
    """(model, run folder or None, what it is, argv for its train.py) of `run.sh SPEC argv...`: a
    job array over models (a,b,c: task i trains model i), over the folds of one model (--folds K),
    or over both (a,b,c --folds K: task i is model i // K tested on fold i % K)."""
    folds = value_of("--folds", argv)
    if folds is not None and not folds.isdigit():
        raise UserError(f"argument --folds: expected a number, got '{folds}'")
    folds = int(folds or 0)
    models, fold, out = spec.split(","), None, value_of("--output-dir", argv)
    per_model = folds or 1
    last = len(models) * per_model - 1
    if len(models) > 1 and task is None:
        raise UserError(f"a model list ({spec}) is for a job array, one task per model"
                        f"{' and fold' if folds else ''}: sbatch --array=0-{last} run.sh {spec} ..., "
                        "or give one model")  # fmt: skip
    if task is not None and (len(models) > 1 or folds) and task > last:
        has = (f"{spec}{f' x --folds {folds}' if folds else ''} has tasks" if len(models) > 1
               else f"--folds {folds} has folds")  # fmt: skip
        raise UserError(f"array task {task}, but {has} 0-{last}: sbatch --array=0-{last}")
    model = models[task // per_model] if len(models) > 1 else spec
    if model not in models_here():
        raise UserError(f"first argument must be a model (a folder with model.py and train.py: "
                        f"{' '.join(models_here())}) or sweep (got '{spec}')")  # fmt: skip
    array = task is not None and (len(models) > 1 or folds > 0)
    if array and folds:
        fold = task % folds
        taken = "--fold/--test-fold" if len(models) > 1 else "--fold"
        if any(value_of(f, argv) is not None for f in taken.split("/")):
            over = "models and --folds" if len(models) > 1 else "--folds"
            raise UserError(f"argument {taken}: in a job array over {over}, the task's index gives the fold")
    run_dir = None
    if array and out is None and folds:  # a folder shared by the array's tasks
        out = f"runs/{'cmp' if len(models) > 1 else model}-cv{folds}-{array_job or 'local'}"
    if array and out is not None:
        run_dir = run_folder(out, model if len(models) > 1 else None, fold)
        argv = drop("--output-dir", argv) + ["--output-dir", str(run_dir)]
        if len(models) > 1 and folds:  # tools.compare --folds's split: no validation unless said
            argv = ["--val-frac", "0", *argv, "--test-fold", str(fold)]
        elif folds:
            argv = [*argv, "--fold", str(fold)]
    elif job and out is None and value_of("--resume", argv) is None:
        run_dir = Path("runs") / f"{model}-{job}"  # a requeued job finds it and resumes
        argv = [*argv, "--output-dir", str(run_dir)]
    what = model + (f" fold {fold} of {folds}" if fold is not None else "")
    return model, run_dir, what, argv


def drop(name, argv):
    """argv without flag `name` and its value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def last_fold_done(spec, argv, task):
    """The tools.folds summary command once every fold of an array over one model's folds has
    finished (the last task to finish prints the table), else None."""
    folds, out = int(value_of("--folds", argv) or 0), value_of("--output-dir", argv)
    if "," in spec or not folds or task is None or out is None or value_of("--test-fold", argv) is not None:
        return None
    out = Path(out).parent  # argv is the task's own: --output-dir OUT/fold-k
    if all((run_folder(out, fold=k) / "summary.json").is_file() for k in range(folds)):
        return ["-m", "tools.folds", spec, "--folds", str(folds), "--output-dir", str(out), "--summary"]
    return None


def main(argv=None):
    """For run.sh: `python -m common.jobs SPEC ARGS...` prints bash assignments of model, run_dir,
    what and the training flags (args); with --after, the command to run once the task ended."""
    argv = sys.argv[1:] if argv is None else argv
    after = argv[:1] == ["--after"]
    spec, rest = argv[after], argv[after + 1 :]
    env = os.environ
    task = int(env["SLURM_ARRAY_TASK_ID"]) if env.get("SLURM_ARRAY_TASK_ID") else None
    if after:
        print(shlex.join(last_fold_done(spec, rest, task) or []))
        return 0
    model, run_dir, what, args = plan(
        spec, rest, task, env.get("SLURM_JOB_ID"), env.get("SLURM_ARRAY_JOB_ID")
    )
    print(f"model={shlex.quote(model)} run_dir={shlex.quote(str(run_dir or ''))} what={shlex.quote(what)}")
    print(f"args=({shlex.join(args)})")
    return 0


if __name__ == "__main__":
    sys.exit(contract(main))
