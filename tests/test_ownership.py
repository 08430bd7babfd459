"""A folder says what it is, and only its owner writes it (common/folders.py); commands that run
commands give back their children's errors (common.errors.child); tables pair one recipe."""

import json
import shutil
import sys

import pytest
from conftest import TINY, run

from common.folders import claim, finished, kind_of
from tools.pack import write_pack

ONE = [*TINY, "--epochs", "1"]


def one_line(p, *says):
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for s in says:
        assert s in lines[0], lines[0]


def copy_run(finished, folder, **changes):
    """The session's finished tiny run (conftest.finished) copied to `folder`, its args.json changed:
    a run of another model or recipe, for the checks that read the records before anything else."""
    shutil.copytree(finished / "run", folder)
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, **changes}))
    return folder


def compare(env, out, *flags, train=()):
    return run([sys.executable, "-m", "tools.compare", "--output-dir", str(out), *flags, "--", *train], env)


def test_a_comparison_into_a_run_folder_is_refused_and_the_runs_split_kept(finished, phantoms, tmp_path, env):
    """The leak of round three: the comparison's table wrote its split.json over the run's own."""
    run_dir = copy_run(finished, tmp_path / "run")
    before = (run_dir / "split.json").read_bytes()
    for flags in (["--models", "unet"], ["--table", "--models", "unet"]):
        p = compare(env, run_dir, *flags, train=["--data-dir", str(phantoms), *ONE])
        one_line(p, f"--output-dir {run_dir} holds a training run", "not a comparison")
    assert (run_dir / "split.json").read_bytes() == before
    assert not (run_dir / "per-patient.csv").exists() and not (run_dir / "folder.json").exists()


def test_a_run_into_another_commands_folder_is_refused(phantoms, tmp_path, env):
    for kind in ("comparison", "folds", "sweep"):
        claim(tmp_path / kind, kind)
        p = run([sys.executable, "unet/train.py", "--data-dir", str(phantoms), *ONE, "--output-dir",
                 str(tmp_path / kind)], env)  # fmt: skip
        one_line(p, f"holds {'a' if kind != 'folds' else 'cross'}", "not a training run")
        assert sorted(f.name for f in (tmp_path / kind).iterdir()) == ["folder.json"]


def test_a_comparison_again_with_other_training_flags_is_refused(phantoms, tmp_path, env):
    out = tmp_path / "cmp"
    flags = ["--data-dir", str(phantoms), *ONE]
    assert compare(env, out, "--models", "unet", train=flags).returncode == 0
    p = compare(env, out, "--models", "unet", train=[*flags, "--lr", "0.01"])
    one_line(p, f"--output-dir {out} holds a comparison (tools.compare) made with flags", "--lr 0.01")
    assert compare(env, out, "--models", "unet", train=flags).returncode == 0  # the same again: kept


@pytest.mark.parametrize(
    "change, said",
    [
        ({"image_size": 96}, "--image-size (fcn: 96, unet: 64)"),
        ({"max_steps": 1}, "--max-steps (fcn: 1, unet: 0)"),  # a smoke run left in the folder
        ({"tta": True}, "--tta (fcn: True, unet: False)"),
        ({"mixed_precision": "bf16"}, "--mixed-precision (fcn: bf16, unet: None)"),
        ({"postprocess": "lcc"}, "--postprocess (fcn: lcc, unet: auto)"),
        ({"synthetic": True}, "--synthetic (fcn: True, unet: False)"),
        ({"seed": 3}, "--seed (fcn: 3, unet: 0)"),
    ],
)
def test_a_table_of_runs_trained_differently_is_refused(finished, tmp_path, env, change, said):
    """Every flag that changes a result is part of a run's identity: no table joins runs that differ."""
    out = tmp_path / "cmp"
    copy_run(finished, out / "unet")
    copy_run(finished, out / "fcn", model="fcn", **change)
    p = compare(env, out, "--table", "--models", "unet,fcn")
    one_line(p, f"different {said}")
    assert not (out / "per-patient.csv").exists()


def test_folds_of_another_model_or_fold_count_are_not_tabled_as_these(finished, tmp_path, env):
    out = tmp_path / "cv"
    for fold in (0, 1):
        copy_run(finished, out / f"fold-{fold}", model="fcn", folds=2, fold=fold)
    p = run(
        [sys.executable, "-m", "tools.folds", "unet", "--folds", "2", "--summary", "--output-dir", str(out)],
        env,
    )
    one_line(p, "a fcn run of --folds 2 --fold 0, not unet fold 0 of 2")
    p = run(
        [sys.executable, "-m", "tools.folds", "fcn", "--folds", "3", "--summary", "--output-dir", str(out)],
        env,
    )
    one_line(p, "not fcn fold 0 of 3")
    assert not (out / "cv.json").exists()


def test_a_run_folder_keeps_what_its_network_sees_and_its_model(finished, phantoms, tmp_path, env):
    out = copy_run(finished, tmp_path / "run")
    p = run(
        [sys.executable, "unet/train.py", "--resume", str(out), "--image-size", "96", "--epochs", "2"], env
    )
    one_line(p, f"--resume {out}: the run was trained with --image-size 64, not 96")
    p = run([sys.executable, "fcn/train.py", "--resume", str(out)], env)
    one_line(p, "holds a unet run, not fcn")
    timing = copy_run(finished, tmp_path / "timing", no_eval=True)  # a finished --no-eval run: a result,
    shutil.rmtree(timing / "last"), (timing / "best.pt").unlink()  # but no checkpoint
    p = run([sys.executable, "fcn/train.py", "--data-dir", str(phantoms), *ONE, "--no-eval", "--output-dir",
             str(timing)], env)  # fmt: skip
    one_line(p, f"--output-dir {timing} holds a unet run, not fcn")
    assert json.loads((timing / "args.json").read_text())["model"] == "unet"


def test_a_childs_user_error_comes_back_as_that_error(phantoms, tmp_path, env):
    p = compare(env, tmp_path / "cmp", "--models", "unet", train=["--data-dir", str(tmp_path / "none"), *ONE])
    one_line(p, "unet: data folder not found")
    p = compare(env, tmp_path / "cmp2", "--models", "unet", "--launch", "no-such-launcher",
                train=["--data-dir", str(phantoms), *ONE])  # fmt: skip
    one_line(p, "unet: cannot run no-such-launcher")
    p = compare(
        env, tmp_path / "cmp3", "--models", "unet", train=["--data-dir", str(phantoms), *ONE, "--no-test"]
    )
    one_line(p, "--no-test: a comparison tables the models on their test patients")
    assert not (tmp_path / "cmp3").exists()  # refused before anything trains
    folds = [
        sys.executable,
        "-m",
        "tools.folds",
        "unet",
        "--folds",
        "2",
        "--output-dir",
        str(tmp_path / "cv"),
    ]
    p = run([*folds, "--", "--data-dir", str(tmp_path / "none"), *ONE], env)
    one_line(p, "fold 0: data folder not found")


def test_a_time_limited_run_is_not_finished_and_the_next_call_resumes_it(phantoms, tmp_path, env):
    out = tmp_path / "cmp"
    flags = ["--data-dir", str(phantoms), *TINY, "--epochs", "3", "--time-limit", "0.001"]
    p = compare(env, out, "--models", "unet", train=flags)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(
        "error: 1 of 1 runs not finished"
    )
    assert "unet (stopped by --time-limit)" in p.stderr and not finished(out / "unet")
    flags[-1] = "0"  # --time-limit is not part of what the comparison is made with
    assert compare(env, out, "--models", "unet", train=flags).returncode == 0
    assert [r["epoch"] for r in map(json.loads, (out / "unet" / "metrics.jsonl").open())] == [1, 2, 3]


def test_a_table_names_the_requested_runs_it_lacks(finished, tmp_path, env):
    out = tmp_path / "cmp"
    copy_run(finished, out / "unet")
    p = compare(env, out, "--table", "--models", "unet,fcn")
    assert p.returncode == 1 and (out / "per-patient.csv").is_file()
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 runs not finished") and "fcn (not started)" in last


def test_an_empty_sweep_grid_leaves_the_last_sweep_whole(tmp_path, env):
    out = tmp_path / "sweep"
    claim(out, "sweep")
    (out / "sweep-unet.csv").write_text("kept\n")
    p = run([sys.executable, "-m", "tools.sweep", "unet", "--pipelines", "device", "--workers", "1",
             "--output-dir", str(out), "--", "--synthetic"], env)  # fmt: skip
    one_line(p, "the grid is empty")
    assert (out / "sweep-unet.csv").read_text() == "kept\n"


def test_a_pack_below_the_image_size_is_refused(phantoms, tmp_path, env):
    written = write_pack(phantoms, tmp_path / "p.pack", tmp_path / "c", size=64, progress=False)
    p = run(
        [sys.executable, "unet/train.py", "--data-dir", str(written[0]), *TINY, "--image-size", "128"], env
    )
    one_line(p, "packed at 64 px, below --image-size 128")


def test_kinds_are_told_from_their_files_for_folders_made_before_folder_json(tmp_path):
    for name, kind in (("args.json", "run"), ("per-patient.csv", "comparison"), ("cv.json", "folds"),
                       ("sweep-unet.csv", "sweep")):  # fmt: skip
        (tmp_path / kind).mkdir()
        (tmp_path / kind / name).write_text("{}")
        assert kind_of(tmp_path / kind) == kind
    (tmp_path / "empty").mkdir()
    assert kind_of(tmp_path / "empty") is None


@pytest.mark.parametrize(
    "command, wrong, right",
    [
        ("compare", ["--epochs", "0"], ["--epochs", "1"]),  # a typo after --: the child refuses it
        ("folds", ["--folds", "9"], ["--folds", "2"]),  # more folds than the 4 patients
    ],
)
def test_a_failed_attempt_leaves_no_claim_on_its_folder(phantoms, tmp_path, env, command, wrong, right):
    """A folder is bound to its flags from its first run on: the corrected command is taken."""
    out = tmp_path / command
    data = ["--data-dir", str(phantoms), *TINY]

    def attempt(flags):
        if command == "compare":
            return compare(env, out, "--models", "unet", train=[*data, *flags])
        return run([sys.executable, "-m", "tools.folds", "unet", *flags, "--output-dir", str(out), "--",
                    *data, "--epochs", "1"], env)  # fmt: skip

    first = attempt(wrong)
    assert first.returncode != 0 and not any(out.rglob("args.json")), first.stderr
    second = attempt(right)
    assert second.returncode == 0, second.stdout + second.stderr


def test_a_folds_summary_of_folds_trained_differently_is_refused(finished, tmp_path, env):
    """Fold 0 of one seed and fold 1 of another: one fold's test patient is the other's training one."""
    out = tmp_path / "cv"
    copy_run(finished, out / "fold-0", folds=2, fold=0)
    copy_run(finished, out / "fold-1", folds=2, fold=1, seed=3)
    p = run(
        [sys.executable, "-m", "tools.folds", "unet", "--folds", "2", "--output-dir", str(out), "--summary"],
        env,
    )
    one_line(p, "different --seed (fold 0: 0, fold 1: 3)")
