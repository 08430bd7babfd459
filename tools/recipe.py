"""The recipe study's table (docs/studies/stronger-recipe): each variant against the plain preset on
the same patients, per-patient Dice with its bootstrap interval, the paired difference, and the cost.

    bash docs/studies/stronger-recipe/run.sh data/kaggle_3m runs/recipe   # the runs (validation only)
    python -m tools.recipe runs/recipe --output-dir docs/studies/stronger-recipe
    python -m tools.recipe runs/recipe --set test --variants plain,final \\
        --output-dir docs/studies/stronger-recipe

A variant is a run folder (its best epoch's evaluation in summary.json) or an evaluation folder
(eval.json of --eval-only: TTA, ensembles) under the study's folder; with --set test, the folder
test/<variant> (an --eval-only on the test patients, made once, at the end). The first variant is
the reference the others are paired with.
"""

import argparse
import statistics
import sys

from common import files, rundir, stats
from common.cli import Parser
from common.comparison import scores
from common.errors import UserError, contract
from common.folders import make
from common.ranges import pathname, share

# name: (folder under the study's folder, the runs trained for it, what it is)
VARIANTS = {
    "plain": ("plain/seed0", ["plain/seed0"], "the CPU preset (constant lr 1e-3, one network)"),
    "cosine": ("cosine", ["cosine"], "--schedule cosine (5 % warm-up)"),
    "context1": ("context1", ["context1"], "--context 1 (9 input channels)"),
    "tta": ("eval/tta", ["plain/seed0"], "--tta on the plain network"),
    "ensemble": (
        "eval/ensemble",
        ["plain/seed0", "plain/seed1", "plain/seed2"],
        "3 plain networks (--train-seed 0, 1, 2)",
    ),
    "ensemble-tta": (
        "eval/ensemble-tta",
        ["plain/seed0", "plain/seed1", "plain/seed2"],
        "the ensemble with --tta",
    ),
    "together": ("together", ["together"], "--context 1 --schedule cosine"),
    "together-tta": ("eval/together-tta", ["together"], "--context 1 --schedule cosine, --tta"),
}


# args.json keys that say where a run reads and writes, not what it trains (those a run may be
# started again with, and its records): every other key that differs from the reference's names the
# variant (a flag its record lacks too: named, never hidden)
BOOKKEEPING = (*rundir.UNCOMPARED, "data_dir", "cache_dir", "given", "network_flags")


def variant(study, name, reference):
    """(folder, runs, what) of a variant: a known one, or any run folder of the study, described by the
    flags its args.json holds that differ from the reference's (a run folder of the study named
    as a known variant is that folder: the second study's plain/ is a run, the first's plain/seed0)."""
    if name in VARIANTS and not (study / name / "args.json").is_file():
        return VARIANTS[name]

    def record(n, file):
        path = study / n / file
        return files.read_json(path) if path.is_file() else {}

    def commit(n):  # the code a run trained with, where its summary records it
        return (record(n, "summary.json").get("made") or {}).get("commit", "")

    mine, ref = record(name, "args.json"), record(reference, "args.json")
    scored = record(name, "eval.json")
    if not mine and scored:  # an --eval-only folder: what it scored says what it is
        what = f"--eval-only --checkpoint {scored.get('checkpoint')}" + (
            " --tta" if scored.get("tta") else ""
        )
        return name, [name], what
    differ = [
        f"--{k.replace('_', '-')} {v}" for k, v in mine.items() if k not in BOOKKEEPING and v != ref.get(k)
    ]
    if differ or name == reference:
        return name, [name], " ".join(differ) or "the reference"
    # the same flags: what differs is the code (a model changed between the runs), or nothing said
    code = commit(name)
    return (
        name,
        [name],
        f"the reference's flags, the code of {code[:7]}"
        if code != commit(reference)
        else "the reference's flags",
    )


def evaluation(folder, part):
    """The `part` ("val" or "test") evaluation of a run or an --eval-only folder, with per-patient rows."""
    if (folder / "eval.json").is_file():
        result = files.read_json(folder / "eval.json").get(part)
    elif (folder / "summary.json").is_file():
        summary = files.read_json(folder / "summary.json")
        result = summary.get("best_val") if part == "val" else summary.get("test")
    else:
        raise UserError(f"{folder}: not finished (no summary.json or eval.json): run the study first")
    if not result or "per_patient" not in result:
        raise UserError(f"{folder}: no per-patient {part} evaluation there")
    return result


def train_time(study, runs):
    """Training seconds of the networks a variant needs: each network's median epoch x its epochs
    (an epoch that shared the CPU with other work would otherwise count in full); None where a
    network's epochs are not in the study (an --eval-only folder of a network trained elsewhere)."""
    total = 0.0
    for r in runs:
        epochs = [row["train_time_s"] for row in files.read_jsonl(study / r / "metrics.jsonl")]
        if not epochs:
            return None
        total += statistics.median(epochs) * len(epochs)
    return total


def curve(study, run):
    """(training seconds, validation Dice per patient) after each epoch of a run: seconds counted as
    the run's median epoch times the epochs done, as train_time does."""
    epochs = files.read_jsonl(study / run / "metrics.jsonl")
    pace = statistics.median(row["train_time_s"] for row in epochs)
    return [(pace * row["epoch"], row.get("val_dice_patient_mean")) for row in epochs]


def time_to(points, target):
    """Training seconds until validation Dice per patient first reaches `target`; None if never."""
    return next((t for t, dice in points if dice is not None and dice >= target), None)


def curves_figure(study, names, target, path):
    """Validation Dice per patient against training seconds, a line per variant (one network each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in names:
        t, dice = zip(*curve(study, n))
        ax.plot([x / 60 for x in t], dice, marker="o", markersize=3, label=n)
    ax.axhline(target, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training minutes (median epoch x epochs, one core)")
    ax.set_ylabel("validation Dice per patient (mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def rows(study, names, part, target=0.75):
    """A row per variant: its scores on the `part` patients, paired with the first variant's."""
    known = {n: variant(study, n, names[0]) for n in names}
    where = {n: study / (known[n][0] if part == "val" else f"test/{n}") for n in names}
    results = {n: evaluation(where[n], part) for n in names}
    per_patient = {n: {r["patient"]: r for r in results[n]["per_patient"]} for n in names}
    patients = sorted(per_patient[names[0]])
    if any(sorted(per_patient[n]) != patients for n in names):
        raise UserError(f"{study}: the variants were evaluated on different {part} patients")
    out = []
    for n in names:
        s = scores([per_patient[n][p] for p in patients])
        diff = stats.paired(
            [per_patient[n][p]["dice"] for p in patients],
            [per_patient[names[0]][p]["dice"] for p in patients],
        )
        out.append(
            {
                "variant": n,
                "what": known[n][2],
                "patients": len(patients),
                **{
                    k: s[k]
                    for k in (
                        "dice_patient_mean",
                        "dice_patient_mean_ci_low",
                        "dice_patient_mean_ci_high",
                        "dice_patient_median",
                        "dice_pooled",
                        "hd95_median",
                    )
                },
                # the reference too (against itself: 0), so that every row has the same columns
                **{f"vs_{names[0]}_{k}": v for k, v in diff.items() if k != "patients"},
                "postprocess": results[n].get("postprocess"),
                "dice_patient_post_mean": results[n].get("dice_patient_post_mean"),
                "networks": len(known[n][1]),
                "train_time_s": train_time(study, known[n][1]),
                # time to quality (MLPerf Training's measure), for a variant of one trained network
                f"time_to_{target:g}_s": time_to(curve(study, n), target)
                if part == "val" and known[n][1] == [n] and (study / n / "metrics.jsonl").is_file()
                else None,
                "eval_time_s": results[n]["eval_time_s"],
            }
        )
    return out


def markdown(table, part, target):
    ref = table[0]["variant"]
    lines = [
        f"| variant | Dice per patient, mean [95 % CI] | median | pooled Dice | vs {ref}: mean diff "
        f"[95 % CI], Wilcoxon p, wins/losses | post-processed (chosen on val) | networks | training s "
        f"| {part} evaluation s | validation Dice {target:g} after s |",
        "|" + "---|" * 10,
    ]
    for r in table:
        reached = r[f"time_to_{target:g}_s"]
        lines.append(
            f"| {r['variant']} ({r['what']}) | {r['dice_patient_mean']:.3f} "
            f"[{r['dice_patient_mean_ci_low']:.3f}, {r['dice_patient_mean_ci_high']:.3f}] | "
            f"{r['dice_patient_median']:.3f} | {r['dice_pooled']:.3f} | {paired_cell(r, ref)} | "
            f"{post_cell(r)} | {r['networks']} | {seconds(r['train_time_s'])} | {r['eval_time_s']:.1f} | "
            f"{seconds(reached)} |"
        )
    return "\n".join(lines) + "\n"


def seconds(value):
    return "-" if value is None else f"{value:.0f}"


def post_cell(r):
    if r["postprocess"] is None:  # an evaluation made before --postprocess
        return "-"
    return f"{r['dice_patient_post_mean']:.3f} ({r['postprocess']})"


def paired_cell(r, ref):
    if r["variant"] == ref:
        return "-"
    d = {k[len(f"vs_{ref}_") :]: v for k, v in r.items() if k.startswith(f"vs_{ref}_")}
    if d["wilcoxon_p"] is None:
        return "identical"
    return (
        f"{d['mean_diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p {d['wilcoxon_p']:.3f}, "
        f"{d['wins']}/{d['losses']}"
    )


def parser():
    p = Parser(
        prog="python -m tools.recipe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", type=pathname, help="the folder docs/studies/stronger-recipe/run.sh wrote")
    p.add_argument("--set", choices=("val", "test"), default="val", help="which patients' evaluation")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, the first the reference: {', '.join(VARIANTS)}, or run folders of the study",
    )
    p.add_argument(
        "--target",
        type=share(),
        default=0.75,
        help="time to quality: training seconds until validation Dice per patient first reaches this",
    )
    p.add_argument(
        "--output-dir",
        type=pathname,
        default=None,
        help="write recipe-<set>.csv and .md there (with --set val also dice-vs-time.png)",
    )
    p.add_argument("--debug", action="store_true")
    return p


def main(argv=None):
    return contract(lambda argv: tabulate(parser().parse_args(argv)), argv)


def tabulate(args):
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and not (args.study / n).is_dir()]
    if unknown:
        raise UserError(
            f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)}, or a run folder "
            f"of {args.study})"
        )
    table = rows(args.study, names, args.set, args.target)
    text = markdown(table, args.set, args.target)
    if args.output_dir is not None:
        make(args.output_dir)
        files.write_csv(args.output_dir / f"recipe-{args.set}.csv", table)
        files.replace(args.output_dir / f"recipe-{args.set}.md", lambda tmp: tmp.write_text(text))
        runs = [n for n in names if (args.study / n / "metrics.jsonl").is_file()]
        if args.set == "val" and runs:
            curves_figure(args.study, runs, args.target, args.output_dir / "dice-vs-time.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
