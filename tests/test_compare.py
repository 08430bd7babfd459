"""The comparison: statistics checked by hand, and its tables recomputed from per-patient.csv."""

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import LEARNS, ROOT, compare_in, run

from common import comparison as compare
from common import comparison_cv as cv
from common import files, stats


def assert_scores_of(rows, s):
    """summary.csv's row s holds the scores recomputed from the model's per-patient rows alone."""
    scores = compare.scores(rows)  # bootstraps: computed once
    assert {k: s[k] for k in scores} == {k: pytest.approx(v) for k, v in scores.items()}


def test_bootstrap_interval_by_hand():
    # two patients scoring 0 and 1: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1
    assert stats.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert stats.bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    low, high = stats.bootstrap_ci(np.linspace(0, 1, 41))
    assert 0.40 < low < 0.5 < high < 0.60  # mean 0.5, standard error 0.3 / sqrt(41) = 0.047


def test_paired_statistics_by_hand():
    a, b = [0.9, 0.8, 0.7, 0.6, 0.5], [0.8, 0.6, 0.4, 0.2, 0.0]  # differences 0.1 .. 0.5, all positive
    p = stats.paired(a, b)
    assert p["mean_diff"] == pytest.approx(0.3) and (p["wins"], p["losses"], p["patients"]) == (5, 0, 5)
    assert p["wilcoxon_p"] == pytest.approx(
        2 / 2**5
    )  # exact: only all-positive or all-negative ranks are as extreme
    assert 0.1 <= p["ci_low"] < 0.3 < p["ci_high"] <= 0.5
    same = stats.paired([0.5, 0.6], [0.5, 0.6])
    assert same["wilcoxon_p"] is None and same["ci_low"] == same["ci_high"] == 0


def test_verdict_claims_no_more_than_the_statistics():
    shown = {"a": "unet", "b": "fcn", "mean_diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "wilcoxon_p": 0.01}
    assert compare.verdict(shown).startswith("U-Net scores higher than FCN-8s")
    assert "no difference shown" in compare.verdict({**shown, "ci_low": -0.01, "wilcoxon_p": 0.3})
    assert "not shown" in compare.verdict({**shown, "wilcoxon_p": 0.2})
    p03 = {**shown, "wilcoxon_p": 0.03}  # below 0.05, above 0.05 / 3: shown for one pair, not among three
    assert "scores higher" in compare.verdict(p03) and "not shown" in compare.verdict(p03, pairs=3)
    flipped = {**shown, "a": "fcn", "b": "unet", "mean_diff": -0.05, "ci_low": -0.09, "ci_high": -0.01}
    assert compare.verdict(flipped).startswith("U-Net scores higher than FCN-8s on these patients, by 0.050")
    same = {"a": "unet", "b": "fcn", **stats.paired([0.5, 0.6], [0.5, 0.6])}  # nothing to test or bound
    assert compare.verdict(same) == "U-Net and FCN-8s: the same Dice on every patient."


@pytest.mark.slow
def test_the_comparison_writes_its_folder(comparison):
    out, _ = comparison
    for f in (
        "per-patient.csv",
        "summary.csv",
        "split.json",
        "comparison.md",
        "paired-dice.png",
        "dice-vs-volume.png",
        "predictions.png",
        "unet/best.pt",
        "unet-slice/summary.json",
    ):
        assert (out / f).exists(), f
    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 2 and len(split["val"]) == 1 and split["split"] == "patient"
    rows = compare.read_csv(out / "per-patient.csv")
    assert sorted({r["patient"] for r in rows}) == split["test"]
    assert [r["model"] for r in compare.read_csv(out / "summary.csv")] == [
        "fcn",
        "segnet",
        "unet",
    ]  # folder order
    text = (out / "comparison.md").read_text()
    assert "FCN-8s - U-Net" in text and "slice split" in text


@pytest.mark.slow
def test_summary_csv_is_recomputed_from_per_patient_csv(comparison):
    out, _ = comparison
    rows, summary = compare.read_csv(out / "per-patient.csv"), compare.read_csv(out / "summary.csv")
    for s in summary:
        mine = [r for r in rows if r["model"] == s["model"]]
        for r in mine:  # each row's Dice and IoU from its own counts
            assert r["dice"] == pytest.approx(
                2 * r["tp"] / (2 * r["tp"] + r["fp"] + r["fn"]) if r["tp"] + r["fp"] + r["fn"] else 1
            )
            assert r["iou"] == pytest.approx(
                r["tp"] / (r["tp"] + r["fp"] + r["fn"]) if r["tp"] + r["fp"] + r["fn"] else 1
            )
        tp, fp, fn = (sum(r[k] for r in mine) for k in ("tp", "fp", "fn"))
        assert s["dice_patient_mean"] == pytest.approx(np.mean([r["dice"] for r in mine]))
        assert s["dice_patient_median"] == pytest.approx(np.median([r["dice"] for r in mine]))
        assert s["dice_pooled"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert s["iou_tumor"] == pytest.approx(tp / (tp + fp + fn))
        assert s["dice_patient_mean_ci_low"] <= s["dice_patient_mean"] <= s["dice_patient_mean_ci_high"]
        assert_scores_of(mine, s)
        # and the training loop's own test metrics, computed apart, agree
        loop = json.loads((out / s["model"] / "summary.json").read_text())["test"]
        assert loop["dice_patient_mean"] == pytest.approx(s["dice_patient_mean"])
        assert loop["dice"] == pytest.approx(s["dice_pooled"]) and loop["miou_bg"] == pytest.approx(
            s["miou_bg"]
        )


STUDIES = ROOT / "docs" / "studies"


def test_the_committed_comparisons_are_found():  # the test below is not run on nothing
    assert len(list(STUDIES.glob("*/per-patient.csv"))) >= 3


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in STUDIES.glob("*/per-patient.csv")))
def test_the_committed_comparisons_are_their_per_patient_rows(folder):
    """The committed tables the README quotes are recomputed from their own per-patient rows."""
    out = STUDIES / folder
    rows, summary = compare.read_csv(out / "per-patient.csv"), compare.read_csv(out / "summary.csv")
    for s in summary:
        mine = [r for r in rows if r["model"] == s["model"]]
        assert_scores_of(mine, s)
    names, paired = [s["model"] for s in summary], json.loads((out / "paired.json").read_text())
    if isinstance(paired, list):  # a one-split comparison: the pairs alone
        paired = {"pairs": paired}
    else:  # cross-validated: the pairs within each tertile of tumour volume too
        assert paired["by_tumour_size"] == json.loads(json.dumps(cv.by_size(rows, names)))
    assert paired["pairs"] == json.loads(json.dumps(compare.pairs(rows, names)))


@pytest.mark.slow
def test_table_only_refuses_runs_tested_on_other_patients(comparison, tmp_path):
    out, env = comparison
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    summary = json.loads((copy / "fcn" / "split.json").read_text())
    summary["test"] = ["someone else"]
    (copy / "fcn" / "split.json").write_text(json.dumps(summary))
    p = run([sys.executable, "-m", "tools.compare", "--table", "--output-dir", str(copy)], env)
    assert (
        p.returncode == 2 and p.stderr.startswith("error: --output-dir") and "different patients" in p.stderr
    )


@pytest.mark.slow
def test_the_cross_validated_comparison_tests_every_patient_once(cross_validated):
    out, _ = cross_validated
    rows = compare.read_csv(out / "per-patient.csv")
    for model in ("unet", "fcn"):
        mine = [r for r in rows if r["model"] == model]
        assert sorted(r["patient"] for r in mine) == sorted(
            p.name for p in (out.parent / "kaggle_3m").iterdir()
        )
        for fold in (0, 1):
            split = json.loads((out / model / f"fold-{fold}" / "split.json").read_text())
            assert split["val"] == [] and split["test_fold"] == fold  # the last epoch, no validation
            assert sorted(r["patient"] for r in mine if r["fold"] == fold) == split["test"]
    for f in ("summary.csv", "paired.json", "comparison.md", "paired-dice.png", "predictions.png"):
        assert (out / f).exists(), f
    assert "2-fold cross-validation over 10 patients" in (out / "comparison.md").read_text()


@pytest.mark.slow
def test_cv_summary_and_paired_are_recomputed_from_per_patient_csv(cross_validated):
    out, _ = cross_validated
    rows, summary = compare.read_csv(out / "per-patient.csv"), compare.read_csv(out / "summary.csv")
    for s in summary:
        mine = [r for r in rows if r["model"] == s["model"]]
        assert_scores_of(mine, s)
        folds = [np.mean([r["dice"] for r in mine if r["fold"] == f]) for f in (0, 1)]
        assert s["dice_patient_mean_fold_mean"] == pytest.approx(np.mean(folds))
        assert s["dice_patient_mean_fold_sd"] == pytest.approx(np.std(folds, ddof=1))
    paired = json.loads((out / "paired.json").read_text())
    assert paired["pairs"] == compare.pairs(rows, ["unet", "fcn"])  # the CSV's numbers round-trip
    # the margin is a tiny model's: it moves with the CPU (0.43 on a Xeon, above 0.5 on an EPYC)
    assert paired["pairs"][0]["mean_diff"] > 0.2  # its p too (0.06 on the Xeon): not asserted
    strata = cv.by_size(rows, ["unet", "fcn"])
    assert [s["patients"] for s in paired["by_tumour_size"]] == [s["patients"] for s in strata]
    assert sum(s["patients"] for s in strata) == 10
    assert paired["by_tumour_size"] == json.loads(json.dumps(strata))


@pytest.mark.slow
def test_the_cross_validated_comparison_through_accelerate_launch_is_the_same(cross_validated, tmp_path):
    """Fold 1 trained through the launcher, fold 0 the reference's own folder (kept, as finished)."""
    shutil.copytree(cross_validated[0] / "fcn" / "fold-0", tmp_path / "cmp" / "fcn" / "fold-0")
    launch = f"{sys.executable} -m accelerate.commands.launch --config_file accelerate_configs/cpu.yaml"
    out, _ = compare_in(tmp_path, "--folds", "2", "--models", "fcn", "--launch", launch, train=LEARNS)
    reference = [r for r in compare.read_csv(cross_validated[0] / "per-patient.csv") if r["model"] == "fcn"]
    assert compare.read_csv(out / "per-patient.csv") == reference


@pytest.mark.slow
def test_a_cross_validated_table_names_the_runs_missing_and_refuses_other_splits(cross_validated, tmp_path):
    out, env = cross_validated
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    table = [
        sys.executable,
        "-m",
        "tools.compare",
        "--table",
        "--models",
        "unet,fcn",
        "--output-dir",
        str(copy),
    ]
    p = run([*table, "--folds", "3"], env)
    assert p.returncode == 2 and "holds a comparison (tools.compare) made with folds 2, not 3" in p.stderr
    (copy / "folder.json").unlink()  # as a Slurm array leaves the folder: the runs themselves say
    p = run([*table, "--folds", "3"], env)
    assert p.returncode == 2 and "a run of --folds 2 --test-fold 0, not fold 0 of 3" in p.stderr, p.stderr
    split = json.loads((copy / "fcn" / "fold-1" / "split.json").read_text())
    (copy / "fcn" / "fold-1" / "split.json").write_text(json.dumps({**split, "test": split["test"][1:]}))
    p = run([*table, "--folds", "2"], env)
    assert p.returncode == 2 and "fcn fold 1 was tested on other patients than unet fold 1" in p.stderr
    (copy / "fcn" / "fold-1" / "summary.json").unlink()
    p = run([*table, "--folds", "2"], env)
    assert p.returncode == 2 and "1 of 4 runs not finished (fcn fold 1)" in p.stderr, p.stderr
    assert (copy / "per-patient.csv").read_text() == (out / "per-patient.csv").read_text()  # nothing written


@pytest.mark.slow
def test_a_cross_validated_table_of_the_runs_records_alone_is_the_same(cross_validated, tmp_path):
    """The runs kept as docs/studies/comparison-cv/ keeps them (no checkpoint) give the same table, without
    predictions.png; with checkpoints, it shows the first fold whose models all have theirs."""
    out, env = cross_validated
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    (copy / "unet" / "fold-0" / "best.pt").unlink()
    (copy / "predictions.png").unlink()
    table = [sys.executable, "-m", "tools.compare", "--table", "--folds", "2", "--output-dir", str(copy)]
    p = run([*table, "--models", "unet,fcn"], env)
    assert p.returncode == 0 and "predictions.png (fold 1's models)" in p.stdout, p.stdout
    assert (copy / "predictions.png").is_file()
    (copy / "predictions.png").unlink()
    for run_dir in copy.glob("*/fold-*"):
        for f in run_dir.iterdir():
            if f.name not in ("args.json", "split.json", "summary.json", "metrics.jsonl"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    p = run([*table, "--models", "unet,fcn"], env)
    assert p.returncode == 0 and "no predictions.png (no fold has every best.pt)" in p.stdout, p.stdout
    assert not (copy / "predictions.png").exists()
    for f in ("per-patient.csv", "summary.csv", "paired.json", "comparison.md"):
        assert (copy / f).read_text() == (out / f).read_text(), f


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["comparison", "cross_validated"])
def test_versus_pairs_each_model_with_itself_in_another_folder(kind, request, tmp_path):
    """On one split, and cross-validated (each patient in the same fold there: the same deal)."""
    out, env = request.getfixturevalue(kind)
    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(out, mine)
    shutil.copytree(out, other)
    rows = compare.read_csv(other / "per-patient.csv")
    for r in rows:
        r["dice"] -= 0.1 if r["model"] == "unet" else 0
    files.write_csv(other / "per-patient.csv", rows)
    folds = ["--folds", "2", "--models", "unet,fcn"] if kind == "cross_validated" else []
    cmd = [sys.executable, "-m", "tools.compare", "--table", *folds, "--output-dir", str(mine)]
    cmd += ["--versus", str(other)]
    p = run(cmd, env)
    assert p.returncode == 0, p.stdout + p.stderr
    pairs = {r["a"]: r for r in json.loads((mine / "versus.json").read_text())["pairs"]}
    assert sorted(pairs) == sorted({r["model"] for r in rows})
    assert pairs["unet"]["mean_diff"] == pytest.approx(0.1)
    assert pairs["unet"]["wins"] == len({r["patient"] for r in rows})
    assert pairs["fcn"]["mean_diff"] == 0 and pairs["fcn"]["wilcoxon_p"] is None
    assert "## Against other" in (mine / "comparison.md").read_text()
    before = (mine / "per-patient.csv").stat().st_mtime_ns
    refused = {"other patients": lambda r: r.update(patient="someone else")}
    if kind == "cross_validated":  # one patient dealt into the other fold
        moved = rows[0]["patient"]
        refused["another fold"] = lambda r: r.update(fold=1 - r["fold"]) if r["patient"] == moved else None
    for said, change in refused.items():
        changed = [dict(r) for r in rows]
        for r in changed:
            change(r)
        files.write_csv(other / "per-patient.csv", changed)
        p = run(cmd, env)
        assert p.returncode == 2 and p.stderr.startswith("error: --versus") and said in p.stderr, p.stderr
        assert (mine / "per-patient.csv").stat().st_mtime_ns == before  # refused before writing anything
    p = run(cmd[:-1] + [str(tmp_path / "nothing")], env)
    assert p.returncode == 2 and "no per-patient.csv" in p.stderr


def runs_of_model(out, model):
    """A model's run folders in a comparison: its folder, or its folds'."""
    return sorted((out / model).glob("fold-*")) or [out / model]


def edit_args(folder, **changes):
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, **changes}))


@pytest.mark.parametrize("kind", ["comparison", "cross_validated"])
def test_a_table_names_each_models_own_recipe_from_the_preset_and_refuses_two_commands(
    kind, request, tmp_path
):
    """Runs of one preset may differ by model (its [fcn] table: lr, epochs): the table is made and
    says each model's values. A difference given on a command line, presets that differ, or a
    model's folds that differ are runs of two commands: refused in one line naming the flag."""
    out, env = request.getfixturevalue(kind)
    table = [sys.executable, "-m", "tools.compare", "--table", "--models", "unet,fcn"]
    table += ["--folds", "2"] if kind == "cross_validated" else []

    def copy_with(**fcn):
        copy = tmp_path / f"cmp-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        for model in ("unet", "fcn", "segnet"):
            for run_dir in runs_of_model(copy, model) if (copy / model).is_dir() else []:
                edit_args(run_dir, preset="own.toml")
        for run_dir in runs_of_model(copy, "fcn"):
            edit_args(run_dir, **fcn)
        return copy

    copy = copy_with(fill_flair=0.5)
    p = run([*table, "--output-dir", str(copy)], env)
    assert p.returncode == 0, p.stderr
    md = (copy / "comparison.md").read_text()
    assert "\n- FCN-8s: --fill-flair 0.5\n" in md and "\n- U-Net: --fill-flair 0.0\n" in md, md

    given = json.loads((runs_of_model(out, "fcn")[0] / "args.json").read_text())["given"]
    for fcn, said in [
        ({"fill_flair": 0.5, "given": [*given, "fill_flair"]}, "different --fill-flair"),
        ({"fill_flair": 0.5, "preset": "other.toml"}, "different --fill-flair"),
    ]:
        p = run([*table, "--output-dir", str(copy_with(**fcn))], env)
        assert p.returncode == 2 and said in p.stderr and "a table pairs one recipe" in p.stderr, p.stderr
    if kind == "cross_validated":
        copy = copy_with()
        edit_args(runs_of_model(copy, "fcn")[1], fill_flair=0.5)
        p = run([*table, "--output-dir", str(copy)], env)
        assert p.returncode == 2 and "different --fill-flair (fcn fold 0: " in p.stderr, p.stderr
