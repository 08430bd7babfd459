"""Predict tumour masks with one or more checkpoints, and draw them.

    python -m tools.predict --checkpoint runs/unet-x/best.pt --data-dir some/slices --output-dir predictions
    python -m tools.predict --checkpoint runs/unet-x --checkpoint runs/fcn-y --checkpoint runs/segnet-z \\
        --data-dir data/kaggle_3m/TCGA_CS_4941_19960909 --output-dir predictions

    python -m tools.predict --checkpoint runs/unet-folds --tta --data-dir data/kaggle_3m/TCGA_CS_4941_19960909

--data-dir: a kaggle_3m folder (patient sub-folders), or a folder of `<name>.tif` slices with
optional `<name>_mask.tif` beside them. For each model: `<label>/masks/<name>_pred.tif` (0/255, at
the slice's own size), `<label>/volumes/<patient>.nii.gz` (each patient's masks as one 3-D volume,
slices in the order of their numbers; kaggle_3m records no voxel spacing, so the volume has unit
spacing) and `<label>/figures/<name>.png` (FLAIR, true mask, prediction, overlay with contours:
truth green, prediction red). With several checkpoints, also `comparison.png`: a row per model on
three slices chosen to show a large tumour, a small one and an empty slice.

A --checkpoint folder of runs (e.g. the folds of a --folds run) is their ensemble: the mean of their
probabilities; --ensemble makes one ensemble of all the checkpoints given, --tta adds each slice's
mirror image to the mean.

--patients test (or val, train) keeps the patients of that part of the runs' own split (their
split.json; every checkpoint's must agree), so a model is never shown as predicting patients it
trained on by mistake.
"""

import argparse
import gzip
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from common import data, files, inference, report
from common.checkpoint import members, split_of
from common.cli import Parser
from common.errors import UserError, contract
from common.folders import make
from common.inference import Averaged
from common.ranges import pathname
from common.split import split_key


def find_slices(folder):
    """[(name, image path, mask path or None)] of a kaggle_3m folder or a flat folder of slices."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data-dir: not a folder: {folder}")
    # slices in the folder itself: one patient's (other folders in it, such as an output, are not
    # patients); none: a kaggle_3m folder of patient folders. Masks where they exist.
    files = [f for f in folder.iterdir() if not f.name.startswith(".") and data.NAME.match(f.name)]
    if not files:
        if any(p.is_dir() for p in folder.iterdir()):
            return [(s.image.stem, s.image, s.mask) for s in data.discover(folder, masks=False)]
        raise UserError(f"--data-dir: no .tif slices in {folder}")
    masks = {m["stem"]: f for f in files if (m := data.NAME.match(f.name))["mask"]}
    images = sorted(
        (f for f in files if not data.NAME.match(f.name)["mask"]), key=lambda f: patient_and_number(f.name)
    )
    return [(f.stem, f, masks.get(f.stem)) for f in images]


def of_part(found, data_dir, checkpoints, part):
    """The slices of `found` in the `part` of the checkpoints' split.json (each checkpoint's the same)."""
    paths = [p for c in checkpoints for p in members(c)]
    records = [split_of(p) for p in paths]
    for path, record in zip(paths, records):
        if record is None:
            raise UserError(
                f"--patients {part}: which patients {path} trained on is not known (no split.json beside it)"
            )
    if len({tuple(r[part]) for r in records}) > 1 or len({r["split"] for r in records}) > 1:
        raise UserError(f"--patients {part}: the checkpoints' runs have different {part} sets (split.json)")
    unit = split_key(records[0]["split"])
    keys = [unit(SimpleNamespace(patient=p, n=n)) for p, n in (patient_and_number(f[0]) for f in found)]
    wanted = set(records[0][part])
    chosen = [f for f, k in zip(found, keys) if k in wanted]
    missing = sorted(wanted - set(keys))
    if not chosen:
        raise UserError(f"--patients {part}: no slice in --data-dir {data_dir} is in the runs' {part} set")
    if missing:
        some = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        report.console.print(
            f"note: {len(missing)} of the runs' {part} set are not in --data-dir ({some}): left out"
        )
    return chosen


def patient_and_number(name):
    """(patient, slice number) of a kaggle_3m file name; a name of another form is a patient of its own."""
    m = data.NAME.match(Path(name).stem + ".tif")  # a file's name or a slice's (the stem)
    return (m["patient"], int(m["n"])) if m else (Path(name).stem, 0)


def read(image_path, mask_path):
    """(image, true mask as bool or None), both at the slice's own size, checked as in training."""
    image = data.read_tiff(image_path, ("RGB",))
    return image, None if mask_path is None else data.read_mask(mask_path, image.shape[:2]) > 0


def load_models(args, device):
    """[(network, config, label)]: one per --checkpoint (a folder of runs: their ensemble), or, with
    --ensemble, one for all; with --tta each also averages the mirror images."""
    groups = [members(c) for c in args.checkpoint]
    if args.ensemble:
        groups = [[p for g in groups for p in g]]
    out = []
    for group in groups:
        nets, configs = zip(*(inference.load_model(p) for p in group))
        keys = ("image_size", "context", "normalize", "crop")  # what the members' inputs are
        inputs = {tuple(c.get(k) for k in keys) for c in configs}
        if len(inputs) > 1:
            raise UserError(
                f"--checkpoint: an ensemble's members must take the same inputs ({', '.join(keys)}), "
                f"not {sorted(inputs, key=str)}"
            )
        model = Averaged(nets, mirror=args.tta) if len(nets) > 1 or args.tta else nets[0]
        label = configs[0]["model"] if len({c["model"] for c in configs}) == 1 else "ensemble"
        label = label if len(nets) == 1 else f"{label}-ensemble"
        if len(nets) > 1:  # a folder of runs is averaged whole: say whose average it is
            report.console.print(f"{label}: the mean of {len(nets)} networks: {', '.join(map(str, group))}")
        out.append((model.to(device).eval(), configs[0], label))
    return out


def own_patients(checkpoints, patients):
    """A note where the patients predicted include some a checkpoint trained or validated on: their
    masks are no measure of how it does on new scans."""
    for path in [p for c in checkpoints for p in members(c)]:
        record = split_of(path) or {}
        seen = sorted(set(patients) & set(record.get("train", []) + record.get("val", [])))
        if seen:
            some = ", ".join(seen[:3]) + (", ..." if len(seen) > 3 else "")
            report.console.print(
                f"note: {len(seen)} of these patients ({some}) are among those {path} trained or "
                "validated on: --patients test keeps its test patients"
            )


def dice_table(label, patients, preds, truths):
    """Per-patient Dice (the patient's slices pooled) where every slice of it has its mask."""
    slices = {}
    for patient, pred, truth in zip(patients, preds, truths):
        slices.setdefault(patient, []).append((pred.ravel(), None if truth is None else truth.ravel()))
    scored = {
        p: float(inference.dice(np.concatenate([a for a, _ in v]), np.concatenate([t for _, t in v])))
        for p, v in slices.items()
        if all(t is not None for _, t in v)
    }
    if scored:
        mean = sum(scored.values()) / len(scored)
        each = ", ".join(f"{p} {v:.3f}" for p, v in sorted(scored.items()))
        report.console.print(f"{label}: Dice per patient {mean:.3f} (mean of {len(scored)}): {each}")


def write_volumes(folder, names, masks):
    """<folder>/<patient>.nii.gz: a patient's masks (H, W, slices), 0/1, unit voxel spacing."""
    import nibabel

    folder.mkdir(parents=True, exist_ok=True)
    by_patient = {}
    for name, m in zip(names, masks):
        by_patient.setdefault(patient_and_number(name)[0], []).append(m)
    for patient, stack in by_patient.items():
        if len({m.shape for m in stack}) > 1:
            report.console.print(f"note: {patient}: slices of different sizes, no volume written")
            continue
        volume = np.stack(stack, axis=-1).astype(np.uint8)
        blob = gzip.compress(nibabel.Nifti1Image(volume, np.eye(4)).to_bytes())
        files.replace(folder / f"{patient}.nii.gz", lambda tmp: tmp.write_bytes(blob))
    return len(by_patient)


def parser():
    p = Parser(
        prog="python -m tools.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        type=pathname,
        action="append",
        required=True,
        help="best.pt or a run folder; repeat to compare models",
    )
    p.add_argument("--data-dir", type=pathname, required=True)
    p.add_argument("--output-dir", type=pathname, default=Path("predictions"))
    p.add_argument("--no-figures", action="store_true", help="write the masks only")
    p.add_argument(
        "--patients",
        choices=("all", "train", "val", "test"),
        default="all",
        help="only the slices of this part of the runs' split.json (default: every slice found)",
    )
    p.add_argument(
        "--tta", action="store_true", help="average each slice's and its mirror image's probabilities"
    )
    p.add_argument(
        "--ensemble", action="store_true", help="one model: the mean of all the checkpoints' probabilities"
    )
    p.add_argument("--debug", action="store_true")
    return p


def main(argv=None):
    return contract(lambda argv: run(parser().parse_args(argv)), argv)


def run(args):
    import matplotlib

    matplotlib.use("Agg")
    make(args.output_dir)  # before the predictions it will hold
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = find_slices(args.data_dir)
    if args.patients != "all":
        found = of_part(found, args.data_dir, args.checkpoint, args.patients)
    models = load_models(args, device)
    labels = [label for _, _, label in models]
    labels = [lab if labels.count(lab) == 1 else f"{lab}-{i + 1}" for i, lab in enumerate(labels)]
    names = [name for name, _, _ in found]
    patients = [patient_and_number(name)[0] for name in names]
    own_patients(args.checkpoint, set(patients))
    images, truths = zip(*(read(i, m) for _, i, m in report.track(found, f"reading {len(found)} slices")))
    flairs = [im[..., 1] for im in images]
    preds, written = {}, []
    for (model, cfg, _), label in zip(models, labels):
        preds[label] = inference.predict_native(model, cfg, list(images), patients, device)
        dice_table(label, patients, preds[label], truths)
        folder = args.output_dir / label
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        for name, m in zip(names, preds[label]):
            mask = Image.fromarray(m.astype(np.uint8) * 255)
            files.replace(folder / "masks" / f"{name}_pred.tif", lambda tmp: mask.save(tmp, format="TIFF"))
        written.append(f"{folder / 'masks'}/ ({len(names)} masks)")
        n = write_volumes(folder / "volumes", names, preds[label])
        written.append(f"{folder / 'volumes'}/ ({n} NIfTI volumes, unit spacing)")
        if not args.no_figures:
            (folder / "figures").mkdir(exist_ok=True)
            for i in report.track(range(len(names)), f"drawing {label}"):
                inference.slice_figure(
                    folder / "figures" / f"{names[i]}.png", names[i], flairs[i], truths[i], preds[label][i]
                )
            written.append(f"{folder / 'figures'}/ ({len(names)} figures)")
    if len(models) > 1 and not args.no_figures:
        path = args.output_dir / "comparison.png"
        inference.comparison_figure(
            path, names, flairs, truths, preds, labels, inference.choose(truths, flairs)
        )
        written.append(str(path))
    for line in written:
        report.console.print(f"wrote {line}")


if __name__ == "__main__":
    sys.exit(main())
