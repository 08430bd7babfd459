"""The cross-validated comparison's table (`tools.compare --folds K`): every patient is dealt into K
folds and tested once, by the models trained on the other folds; per-patient rows over all of them,
intervals over all patients, and the pairs of models on the same patients, also by tumour size.

Writes into the comparison folder: per-patient.csv (a row per model and patient, with its fold),
summary.csv, paired.json, comparison.md and the figures of tools.compare (predictions.png: the first
fold whose models' checkpoints are all there; left out where none is, as in a folder of the runs'
records alone, such as docs/studies/comparison-cv/).
"""

import statistics

import numpy as np

from common import comparison, files, report
from common.errors import UserError
from common.folders import finished, model_recipes, same_recipe
from common.jobs import run_folder

STRATA = ("small", "medium", "large")  # tertiles of the patients' tumour volume


def load(out, names, folds):
    """{model: [(args, summary, split) of fold 0..K-1]}, each fold checked to be that fold of K; the
    runs missing are named, not left out of the table."""
    runs, missing = {}, []
    for n in names:
        runs[n] = []
        for i in range(folds):
            d = run_folder(out, n, i)
            if not finished(d):
                missing.append(f"{n} fold {i}")
                continue
            split = files.read_json(d / "split.json")
            if (split.get("folds"), split.get("test_fold")) != (folds, i):
                raise UserError(
                    f"--output-dir {d}: a run of --folds {split.get('folds')} --test-fold "
                    f"{split.get('test_fold')}, not fold {i} of {folds}"
                )
            runs[n].append(tuple(files.read_json(d / f) for f in ("args.json", "summary.json")) + (split,))
    if missing:
        raise UserError(
            f"--output-dir {out}: {len(missing)} of {len(names) * folds} runs not finished "
            f"({', '.join(missing)}): run the same command again to train them"
        )
    return runs


def check_patients(out, runs, names):
    """Fold i tests the same patients for every model, and the folds cover each patient once."""
    first = [set(split["test"]) for _, _, split in runs[names[0]]]
    for n in names[1:]:
        for i, (_, _, split) in enumerate(runs[n]):
            if set(split["test"]) != first[i]:
                raise UserError(
                    f"--output-dir {out}: {n} fold {i} was tested on other patients than {names[0]} "
                    f"fold {i}: give the models the same split flags"
                )
    every = [p for fold in first for p in fold]
    if len(every) != len(set(every)):
        raise UserError(f"--output-dir {out}: a patient is tested in two folds")


def rows_of(runs, names):
    """per-patient.csv: each model's test rows of every fold, with the fold."""
    out = []
    for n in names:
        for i, (_, summary, _) in enumerate(runs[n]):
            for r in comparison.patient_rows(n, summary):
                out.append({"model": n, "fold": i, **{k: v for k, v in r.items() if k != "model"}})
    return out


def summarise(runs, names, per_patient):
    """summary.csv: each model's scores over all patients, and their spread over the folds."""
    rows = []
    for n in names:
        mine = [r for r in per_patient if r["model"] == n]
        fold_means = [
            float(np.mean([r["dice"] for r in mine if r["fold"] == i])) for i in range(len(runs[n]))
        ]
        times = [s["train_time_s"] for _, s, _ in runs[n]]
        args, summary, _ = runs[n][0]
        rows.append(
            {
                **comparison.run_row(n, args, summary),
                "train_time_s": statistics.fmean(times),  # per fold
                "best_epoch": statistics.median_low(
                    s["best_epoch"] for _, s, _ in runs[n]
                ),  # the folds' median
                "folds": len(runs[n]),
                "train_time_s_total": sum(times),
                "dice_patient_mean_fold_mean": statistics.fmean(fold_means),
                "dice_patient_mean_fold_sd": statistics.stdev(fold_means),
                **comparison.scores(mine),
            }
        )
    return rows


def by_size(per_patient, names):
    """The pairs of models within each tertile of tumour volume (the truth's, the same for all)."""
    volume = {r["patient"]: r["tumour_voxels"] for r in per_patient if r["model"] == names[0]}
    cuts = np.quantile(list(volume.values()), [1 / 3, 2 / 3])
    strata = []
    for k, name in enumerate(STRATA):
        low, high = ([-np.inf, *cuts, np.inf])[k : k + 2]
        inside = {p for p, v in volume.items() if low < v <= high}
        rows = [r for r in per_patient if r["patient"] in inside]
        bounds = [min(volume[p] for p in inside), max(volume[p] for p in inside)] if inside else None
        pairs = comparison.pairs(rows, names) if len(inside) > 1 else []
        strata.append({"stratum": name, "tumour_voxels": bounds, "patients": len(inside), "pairs": pairs})
    return strata


def markdown(summary, paired, strata, folds, val_frac, own):
    s0 = summary[0]
    chosen = (
        "Each fold's model is its last epoch (no validation patients)"
        if not val_frac
        else f"Each fold's best epoch chosen on {val_frac:g} of the patients, drawn from its training folds"
    )
    lines = [
        f"# {', '.join(comparison.title(s['model']) for s in summary)}: {folds}-fold cross-validation over "
        f"{s0['test_patients']} patients, each tested once",
        "",
        f"{comparison.setup_line(s0, own)} {chosen}; training: seconds per fold. {comparison.MEASURES}",
        "",
        *comparison.own_lines(own),
        comparison.COLUMNS + " per-fold mean +- sd |",
        "|---" * (comparison.COLUMNS.count(" | ") + 1) + "|---|",
        *[
            comparison.model_row(s)
            + f" {s['dice_patient_mean_fold_mean']:.3f} +- {s['dice_patient_mean_fold_sd']:.3f} |"
            for s in summary
        ],
    ]
    if paired:
        lines += comparison.paired_section(
            paired, f"Paired comparison (per-patient Dice, all {s0['test_patients']} patients)"
        )
    for s in strata:
        if s["pairs"]:
            v = s["tumour_voxels"]
            heading = f"{s['stratum'].capitalize()} tumours ({s['patients']} patients, {v[0]}-{v[1]} voxels)"
            lines += comparison.paired_section(s["pairs"], heading)
    return "\n".join(lines) + "\n"


def shown_fold(out, names, folds):
    """The first fold whose every model has its best.pt (predictions.png shows it), or None."""
    have = lambda i: all((run_folder(out, n, i) / "best.pt").is_file() for n in names)  # noqa: E731
    return next((i for i in range(folds) if have(i)), None)


def table(out, names, folds, other=None):
    runs = load(out, names, folds)
    for n in names:  # a model's folds: one recipe, but for the fold tested
        same_recipe(
            {f"{n} fold {i}": run[0] for i, run in enumerate(runs[n])}, f"--output-dir {out}", ("test_fold",)
        )
    own = model_recipes({n: runs[n][0][0] for n in names}, f"--output-dir {out}")
    check_patients(out, runs, names)
    per_patient = rows_of(runs, names)
    summary = summarise(runs, names, per_patient)
    against = comparison.versus(out, other, per_patient, summary) if other else None  # before writing
    paired = comparison.pairs(per_patient, names)
    strata = by_size(per_patient, names) if len(names) > 1 else []
    files.write_csv(out / "per-patient.csv", per_patient)
    files.write_csv(out / "summary.csv", summary)
    files.write_json(out / "paired.json", {"pairs": paired, "by_tumour_size": strata})
    val_frac = runs[names[0]][0][0]["val_frac"]
    md = markdown(summary, paired, strata, folds, val_frac, own)
    if against:
        md = comparison.versus_written(out, other, against, md)
    files.write_text(out / "comparison.md", md)
    shown = shown_fold(out, names, folds)
    folders = None if shown is None else {n: run_folder(out, n, shown) for n in names}
    comparison.figures(out, names, per_patient, {n: runs[n][shown or 0] for n in names}, folders)
    report.console.print((out / "comparison.md").read_text())
    made = (
        f"predictions.png (fold {shown}'s models)"
        if folders
        else "no predictions.png (no fold has every best.pt)"
    )
    report.console.print(
        f"wrote {out}/: per-patient.csv summary.csv paired.json comparison.md paired-dice.png"
        + (" versus.json" if other else "")
    )
    report.console.print(f"  dice-vs-volume.png, {made}")
