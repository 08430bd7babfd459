"""The comparison's tables and figures from finished run folders (`tools.compare`): per-patient rows,
scores with intervals over patients, paired tests between models, comparison.md, and the figures
paired-dice.png, dice-vs-volume.png and predictions.png."""

import itertools
from pathlib import Path

import numpy as np

from common import files, inference, registry, report, stats
from common.cache import open_dataset
from common.errors import Incomplete, UserError
from common.folders import finished, model_recipes, not_finished, shown
from common.metrics import ratio

ORIGINAL = "unet-slice"  # U-Net on the original's leaky slice split, for contrast


def title(name):
    """How tables name a run: its model's TITLE (the original protocol's run says so)."""
    if name == ORIGINAL:
        return f"{registry.title('unet')}, slice split"
    return registry.title(name)


PATIENT_COLUMNS = [
    "model",
    "patient",
    "slices",
    "tumour_slices",
    "tumour_voxels",
    "dice",
    "iou",
    "hd95",
    "dice_lcc",
    "iou_lcc",
    "hd95_lcc",
    "tp",
    "fp",
    "fn",
    "tn",
]


RUN_COLUMNS = [
    "model",
    "parameters",
    "train_time_s",
    "images_per_s",
    "device",
    "world_size",
    "precision",
    "width",
    "image_size",
    "epochs",
    "best_epoch",
    "loss",
    "miou_bg_seed",
    "scored_at",
]


def load_runs(out):
    """{name: (args, summary, split)} of the finished run folders in `out`."""
    runs = {}
    for folder in sorted(p for p in out.iterdir() if finished(p)):
        read = lambda f: files.read_json(folder / f)  # noqa: E731
        runs[folder.name] = read("args.json"), read("summary.json"), read("split.json")
    return runs


def patient_rows(name, summary):
    if not summary.get("test") or "per_patient" not in summary["test"]:
        raise UserError(
            f"{name}: its summary.json has no per-patient test rows (a run of an older version, "
            f"or one without test patients)"
        )
    return [{"model": name, **{k: r[k] for k in PATIENT_COLUMNS[1:]}} for r in summary["test"]["per_patient"]]


def scores(rows):
    """Test scores of one model from its per-patient rows alone (tests recompute summary.csv so)."""
    dice = [r["dice"] for r in rows]
    tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn"))
    hd = [r["hd95"] for r in rows if r["hd95"] not in (None, "")]
    iou_tumor, iou_bg = ratio(tp, tp + fp + fn), ratio(tn, tn + fp + fn)
    mean_lo, mean_hi = stats.bootstrap_ci(dice)
    med_lo, med_hi = stats.bootstrap_ci(dice, np.median)
    return {
        "test_patients": len(rows),
        "dice_patient_mean": float(np.mean(dice)),
        "dice_patient_mean_ci_low": mean_lo,
        "dice_patient_mean_ci_high": mean_hi,
        "dice_patient_median": float(np.median(dice)),
        "dice_patient_median_ci_low": med_lo,
        "dice_patient_median_ci_high": med_hi,
        "dice_patient_lcc_mean": float(np.mean([r["dice_lcc"] for r in rows])),
        "dice_pooled": ratio(2 * tp, 2 * tp + fp + fn),
        "iou_tumor": iou_tumor,
        "miou_bg": (iou_tumor + iou_bg) / 2,
        "hd95_mean": float(np.mean(hd)) if hd else None,
        "hd95_median": float(np.median(hd)) if hd else None,
        "hd95_patients": len(hd),
    }


def run_row(name, args, summary):
    return {
        "model": name,
        "parameters": summary["parameters"],
        "train_time_s": summary["train_time_s"],
        "images_per_s": summary["images_per_s"],
        "device": summary["device"],
        "world_size": summary["world_size"],
        "precision": summary["mixed_precision"],
        "width": summary["width"],
        "image_size": summary["image_size"],
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "loss": args["loss"],
        "miou_bg_seed": summary["test"]["miou_bg_seed"],
        "scored_at": scored_at(summary),
    }


def scored_at(summary):
    """Where a run's test metrics were counted: "native" (the masks as released), or, for runs made
    before scoring moved there, on masks resized to the run's size."""
    return summary["test"].get("scored_at") or f"masks resized to {summary['image_size']} px"


def read_csv(path, columns=()):
    """Rows of a CSV written by write_csv, numbers as floats, empty cells as None."""

    def value(v):
        try:
            return float(v)
        except ValueError:
            return v or None

    return [{k: value(v) for k, v in r.items()} for r in files.read_csv(path, columns)]


def pairs(per_patient, names):
    """Paired statistics of per-patient Dice for each pair of models, on the patients they share."""
    by = {n: {r["patient"]: r["dice"] for r in per_patient if r["model"] == n} for n in names}
    out = []
    for a, b in itertools.combinations(names, 2):
        common = sorted(by[a].keys() & by[b].keys())
        out.append({"a": a, "b": b, **stats.paired([by[a][p] for p in common], [by[b][p] for p in common])})
    return out


def versus(out, other, per_patient, summary):
    """Each model against the same model of another comparison folder (another recipe, say) on the
    same test patients (cross-validated: each in the same fold): the paired per-patient Dice
    difference, this folder's minus the other's."""
    theirs = read_csv(other / "per-patient.csv", ("model", "patient", "dice"))
    out_rows = []
    for s in summary:
        mine = {r["patient"]: r for r in per_patient if r["model"] == s["model"]}
        them = {r["patient"]: r for r in theirs if r["model"] == s["model"]}
        if not them:
            continue
        if mine.keys() != them.keys():
            raise UserError(f"--versus {other}: its {s['model']} was tested on other patients than {out}'s")
        if moved := [q for q in sorted(mine) if mine[q].get("fold") != them[q].get("fold")]:
            raise UserError(
                f"--versus {other}: its {s['model']} tested {moved[0]} (and {len(moved) - 1} more) in "
                f"another fold than {out}'s: another deal of the patients"
            )
        patients = sorted(mine)
        paired = stats.paired([mine[q]["dice"] for q in patients], [them[q]["dice"] for q in patients])
        out_rows.append({"a": s["model"], "b": s["model"], **paired})
    if not out_rows:
        raise UserError(f"--versus {other}: none of {out}'s models is there")
    return out_rows


def versus_written(out, other, against, md):
    """versus.json written, and comparison.md's text `md` with its section added."""
    files.write_json(out / "versus.json", {"other": str(other), "pairs": against})
    return md + "\n".join(versus_section(out, other, against)) + "\n"


def versus_section(out, other, rows):
    return paired_section(
        rows,
        f"Against {other.name} (each model with itself, same test patients)",
        f"model: {out.name} - {other.name}",
        lambda r: title(r["a"]),
        lambda r: (f"{title(r['a'])} ({out.name})", f"{title(r['b'])} ({other.name})"),
    )


def table(out, other=None, wanted=()):
    """The comparison of the finished runs in `out`; those of `wanted` that have not finished are
    named after it is written (Incomplete: exit code 1)."""
    runs = load_runs(out)
    names = [n for n in runs if runs[n][0]["split"] == "patient"]
    missing = [f"{n} ({not_finished(out / n)})" for n in wanted if n not in runs]
    unfinished = Incomplete(f"{len(missing)} of {len(wanted)} runs not finished in {out}: "
                            f"{', '.join(missing)}: the same command again trains them")  # fmt: skip
    if not names:
        raise (
            unfinished
            if missing
            else UserError(f"--output-dir {out}: no finished run with a patient split there")
        )
    own = model_recipes({n: runs[n][0] for n in names}, f"--output-dir {out}")
    tests = {n: runs[n][2]["test"] for n in names}
    if any(t != tests[names[0]] for t in tests.values()):
        raise UserError(
            f"--output-dir {out}: the runs were tested on different patients ("
            + "; ".join(f"{n}: {len(t)}" for n, t in tests.items())
            + "): give them the same split flags"
        )
    per_patient = [row for n in names for row in patient_rows(n, runs[n][1])]
    summary = [
        {**run_row(n, runs[n][0], runs[n][1]), **scores([r for r in per_patient if r["model"] == n])}
        for n in names
    ]
    against = versus(out, other, per_patient, summary) if other else None  # refused before writing
    files.write_csv(out / "per-patient.csv", per_patient)
    files.write_csv(out / "summary.csv", summary)
    files.write_json(out / "split.json", runs[names[0]][2])
    paired = pairs(per_patient, names)
    files.write_json(out / "paired.json", paired)
    original = {n: runs[n] for n in runs if runs[n][0]["split"] == "slice"}
    md = markdown(summary, paired, original, runs, own)
    if against:
        md = versus_written(out, other, against, md)
    files.write_text(out / "comparison.md", md)
    figures(out, names, per_patient, runs, {n: out / n for n in names})
    report.console.print((out / "comparison.md").read_text())
    report.console.print(
        f"wrote {out}/: per-patient.csv summary.csv split.json paired.json comparison.md "
        "paired-dice.png dice-vs-volume.png predictions.png" + (" versus.json" if other else "")
    )
    if missing:
        raise unfinished


def fmt(v, f="{:.3f}"):
    return "-" if v is None else f.format(v)


def verdict(p, pairs=1, labels=None):
    """One sentence on a pair, no stronger than its interval and test allow: a model is called
    better only where the paired interval excludes 0 and Wilcoxon's p is below 0.05 / pairs
    (Bonferroni, for the several pairs tested on the same patients). `labels`: how to name a and b."""
    la, lb = labels or (title(p["a"]), title(p["b"]))
    if p.get("wins") == p.get("losses") == 0:  # no interval or test to speak of: say so, not "ahead by 0.000"
        return f"{la} and {lb}: the same Dice on every patient."
    d, level = p["mean_diff"], 0.05 / pairs
    better, worse, sign = (la, lb, 1) if d > 0 else (lb, la, -1)
    low, high = sorted((sign * p["ci_low"], sign * p["ci_high"]))
    by = f"by {abs(d):.3f} Dice per patient on average (95 % interval {low:+.3f} to {high:+.3f})"
    test = f"Wilcoxon p = {fmt(p['wilcoxon_p'], '{:.3g}')}, threshold {level:.3g}"
    excludes_zero = p["ci_low"] > 0 or p["ci_high"] < 0
    significant = p["wilcoxon_p"] is not None and p["wilcoxon_p"] < level
    if excludes_zero and significant:
        return f"{better} scores higher than {worse} on these patients, {by}; {test}."
    if excludes_zero or significant:
        return (
            f"{better} tends to score higher than {worse}, {by}; {test}; but the interval "
            "and the rank test disagree: not shown."
        )
    return f"{la} and {lb}: no difference shown ({better} ahead {by}; {test})."


SELECTION = "Best epoch chosen on validation Dice; test patients used once."


MEASURES = (
    "Per-patient Dice: Dice of each "
    "patient's volume, mean and median over patients with percentile-bootstrap 95 % intervals (10,000 "
    "resamples of patients). Pooled: over all test pixels. mIoU+bg: mean of background and tumour IoU "
    "(background IoU ~0.99), pooled, and by the original's per-batch protocol. HD95 in voxels, over "
    "patients with tumour in both truth and prediction. A model is called better than "
    "another only where the paired bootstrap interval of their per-patient Dice difference excludes 0 "
    "and Wilcoxon's signed-rank p is below 0.05 divided by the number of pairs (Bonferroni)."
)


COLUMNS = (
    "| model | params | epochs (best) | training | img/s | Dice per patient, mean [95 % CI] "
    "| median [95 % CI] | after LCC | pooled Dice | tumour IoU | mIoU+bg pooled / per batch "
    "| HD95 mean / median (n) |"
)


def with_ci(s, key):
    return f"{s[key]:.3f} [{s[key + '_ci_low']:.3f}, {s[key + '_ci_high']:.3f}]"


def model_row(s):
    cells = [
        title(s["model"]),
        f"{s['parameters'] / 1e6:.2f} M",
        f"{s['epochs']} ({s['best_epoch']})",
        f"{s['train_time_s']:.0f} s",
        f"{s['images_per_s']:.0f}",
        with_ci(s, "dice_patient_mean"),
        with_ci(s, "dice_patient_median"),
        f"{s['dice_patient_lcc_mean']:.3f}",
        f"{s['dice_pooled']:.3f}",
        f"{s['iou_tumor']:.3f}",
        f"{s['miou_bg']:.3f} / {fmt(s['miou_bg_seed'])}",
        f"{fmt(s['hd95_mean'], '{:.1f}')} / {fmt(s['hd95_median'], '{:.1f}')} ({s['hd95_patients']})",
    ]
    return "| " + " | ".join(cells) + " |"


def setup_line(s0, own):
    """How the runs of a table were made and scored, from its first summary row: what they share
    (a flag of `own`, each model's own recipe, is said by own_lines)."""
    scored = (
        "at native resolution (the masks as released)"
        if s0["scored_at"] == "native"
        else f"on {s0['scored_at']}"
    )
    flags = set().union(*map(set, own.values()))
    shared = [
        said
        for flag, said in [
            ("--width", f"Width {s0['width']:g}"),
            ("--image-size", f"{s0['image_size']} px"),
            ("--loss", f"loss `{s0['loss']}`"),
        ]
        if flag not in flags
    ]
    return (
        ", ".join([*shared, f"{s0['device']} x {s0['world_size']}"])
        + f", precision {s0['precision']}. Scored {scored}."
    )


def own_lines(own):
    """The flags where the models' recipes differ (each model's own, from the preset), a line each."""
    if not any(own.values()):
        return []
    lines = ["Each model's own recipe (its table in the preset), where the recipes differ:", ""]
    lines += [
        f"- {title(n)}: " + " ".join(f"{f} {shown(v)}" for f, v in flags.items()) for n, flags in own.items()
    ]
    return [*lines, ""]


def markdown(summary, paired, original, runs, own):
    s0 = summary[0]
    setup = setup_line(s0, own)
    lines = [
        f"# {', '.join(title(s['model']) for s in summary)} on {s0['test_patients']} test patients",
        "",
        f"{setup} {SELECTION} {MEASURES}",
        "",
        *own_lines(own),
        COLUMNS,
        "|---" * COLUMNS.count(" | ") + "|---|",
        *[model_row(s) for s in summary],
    ]
    if paired:
        lines += paired_section(paired)
    if original:
        lines += original_section(original, runs)
    return "\n".join(lines) + "\n"


def paired_section(
    paired,
    heading="Paired comparison (per-patient Dice, same test patients)",
    column="A - B",
    row=lambda p: f"{title(p['a'])} - {title(p['b'])}",
    labels=lambda p: None,  # how verdicts name a and b; None: by their titles
):
    lines = [
        "",
        f"## {heading}",
        "",
        f"| {column} | mean difference [95 % CI] | Wilcoxon p | A better / worse (patients) |",
        "|---|---|---|---|",
    ]
    for p in paired:
        lines.append(
            f"| {row(p)} | {p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, "
            f"{p['ci_high']:+.3f}] | {fmt(p['wilcoxon_p'], '{:.3g}')} | {p['wins']} / {p['losses']} |"
        )
    return lines + ["", *[f"- {verdict(p, len(paired), labels(p))}" for p in paired]]


def original_section(original, runs):
    lines = [
        "",
        "## The original's protocol on the same data",
        "",
        "U-Net with the slices of every patient shuffled into train / validation / test (`--split slice`, "
        "the original's leak), against the same U-Net on the patient split.",
        "",
        "| run | split | epochs | validation: mIoU+bg per batch / pooled, Dice "
        "| test: mIoU+bg per batch / pooled, Dice |",
        "|---|---|---|---|---|",
    ]
    for name, (args, s, _) in [(n, runs[n]) for n in ("unet",) if n in runs] + list(original.items()):
        scores = [" / ".join(fmt(s[key][m]) for m in ("miou_bg_seed", "miou_bg")) + f", {fmt(s[key]['dice'])}"
                  for key in ("best_val", "test")]  # fmt: skip
        lines.append(f"| {title(name)} | {args['split']} | {s['epochs']} | {scores[0]} | {scores[1]} |")
    return lines


def figures(out, names, per_patient, runs, folders):
    """paired-dice.png, dice-vs-volume.png and predictions.png; `runs`: a run per model (args,
    summary, split), whose model is in `folders` (None: no predictions.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = {n: {r["patient"]: r["dice"] for r in per_patient if r["model"] == n} for n in names}
    patients = sorted(dice[names[0]])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4.2))
    ys = np.array([[dice[n][p] for n in names] for p in patients])
    ax.plot(range(len(names)), ys.T, color="0.75", linewidth=0.7, zorder=1)  # a line per patient
    for k in range(len(names)):
        ax.scatter(np.full(len(ys), k), ys[:, k], s=14, zorder=2)
        ax.hlines(ys[:, k].mean(), k - 0.25, k + 0.25, color="k", zorder=3)
    ax.set_xticks(range(len(names)), [title(n) for n in names])
    ax.set_ylabel("Dice of the patient's volume")
    ax.set_title(f"{len(patients)} test patients (bar: mean)", fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, out / "paired-dice.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for n in names:
        rows = [r for r in per_patient if r["model"] == n]
        ax.scatter(
            [max(r["tumour_voxels"], 1) for r in rows], [r["dice"] for r in rows], s=14, label=title(n)
        )
    ax.set_xscale("log")
    where = scored_at(runs[names[0]][1])
    voxels = "of the released masks" if where == "native" else f"at {runs[names[0]][1]['image_size']} px"
    ax.set_xlabel(f"tumour volume (voxels {voxels}; 1 = none)")
    ax.set_ylabel("Dice of the patient's volume")
    ax.legend()
    fig.tight_layout()
    files.save_figure(fig, out / "dice-vs-volume.png", dpi=110)
    plt.close(fig)
    if folders:
        prediction_figure(out, names, runs, folders)


def prediction_figure(out, names, runs, folders):
    """The models on the same test slices (a large tumour, a small one, an empty slice), from the data
    as the runs saw them (a kaggle_3m folder or a pack), each model fed as it was trained (its crop,
    context and normalisation: inference.native_masks), shown at the slices' native size."""
    import torch

    args = runs[names[0]][0]
    test = set(runs[names[0]][2]["test"])

    def view(crop):  # the data as a model trained with this --crop saw them
        return open_dataset(Path(args["data_dir"]), Path(args["cache_dir"]), args["image_size"], crop=crop)

    slices, cache = view("none")
    index = [i for i, s in enumerate(slices) if s.patient in test]
    shapes = cache.shapes[index]
    truths = [m[:h, :w] for m, (h, w) in zip(cache.native_masks(index), shapes)]
    flairs = [inference.at_size(cache.images[i][..., 1], t.shape) for i, t in zip(index, truths)]
    picks = inference.choose(truths, flairs)
    shown = [
        k for k in range(len(index)) if slices[index[k]].patient in {slices[index[p]].patient for p in picks}
    ]
    preds = {}
    for n in names:
        model, cfg = inference.load_model(folders[n] / "best.pt", torch.device("cpu"))
        own = view(cfg.get("crop", "none"))[1] if cfg.get("crop", "none") != "none" else cache
        masks = inference.native_masks(
            model, cfg, own, [index[k] for k in shown], [slices[index[k]].patient for k in shown]
        )
        preds[title(n)] = dict(zip(shown, masks))
    names_shown = [f"{slices[i].patient}_{slices[i].n}" for i in index]
    inference.comparison_figure(
        out / "predictions.png", names_shown, flairs, truths, preds, list(preds), picks
    )
