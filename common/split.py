"""The patient split: which slices train, validate and test, drawn from a seed (the same on every
rank and machine), and read back from a run's split.json, which is the truth for everything that
uses the run."""

import hashlib
import itertools
import random

from common.errors import UserError


def split(slices, how, val_frac, test_frac, seed, tumour_pixels=None, folds=0, fold=0, test_fold=None):
    """Indices of the train/val/test slices. By patient (default): no patient on two sides; the
    same seed gives the same split on every rank and machine (Python's seeded shuffle).

    With folds > 1, the test set is held out first, as without folds; the other patients are dealt
    into `folds` folds (deal), so each fold gets a similar share of tumour; fold `fold` validates,
    the rest train. With `test_fold` (outer cross-validation) every patient is dealt, none held out
    first: that fold is the test set, and `val_frac` of all patients, from the others, validate.
    val_frac 0: no validation patients (the run keeps its last epoch)."""
    keys = sorted({s.patient for s in slices}) if how == "patient" else list(range(len(slices)))
    key_of = (lambda i: slices[i].patient) if how == "patient" else (lambda i: i)
    unit = "patients" if how == "patient" else "slices"
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(test_frac * len(keys))) if test_frac > 0 and test_fold is None else 0
    test, rest = keys[:n_test], keys[n_test:]
    n_val = max(1, round(val_frac * len(keys))) if val_frac > 0 else 0
    if test_fold is not None:
        test = deal(rest, slices, key_of, tumour_pixels, folds, test_fold, unit, "patients in all")
        tested = set(test)
        rest = [k for k in rest if k not in tested]
        val = rest[:n_val]
    elif folds > 1:
        val = deal(rest, slices, key_of, tumour_pixels, folds, fold, unit, "outside the test set")
    else:
        val = rest[:n_val]
    in_val = set(val)
    train = [k for k in rest if k not in in_val]
    if not train:
        raise UserError(f"--val-frac/--test-frac: {len(keys)} {unit} leave none to train on")
    side = {k: name for name, ks in (("test", test), ("val", val), ("train", train)) for k in ks}
    out = {name: [] for name in ("train", "val", "test")}
    for i in range(len(slices)):
        out[side[key_of(i)]].append(i)
    return out


def deal(keys, slices, key_of, tumour_pixels, folds, fold, unit, where):
    """Fold `fold` of `keys` dealt into `folds` by their number of tumour slices (largest first, in
    turn forwards and backwards): each fold gets a similar share of tumour."""
    if folds > len(keys):
        raise UserError(f"--folds {folds}: only {len(keys)} {unit} {where}")
    tumour = {k: 0 for k in keys}
    for i in range(len(slices)):
        if key_of(i) in tumour and tumour_pixels[i] > 0:
            tumour[key_of(i)] += 1
    ranked = sorted(keys, key=lambda k: -tumour[k])  # stable: ties keep the seeded order
    turn = [j % folds if (j // folds) % 2 == 0 else folds - 1 - j % folds for j in range(len(ranked))]
    return [k for k, t in zip(ranked, turn) if t == fold]


def refuse_copies(slices, images):
    """A patient is who its images are, whatever its folder is called: two folders holding the same
    slices (a copy, `X - Copy`) would be split as two patients, one tested, the other trained on.
    Compared by the slice count and the first, middle and last slices' pixels."""
    seen = {}
    for patient, group in itertools.groupby(range(len(slices)), key=lambda i: slices[i].patient):
        idx = list(group)
        digest = hashlib.blake2b(str(len(idx)).encode())
        for i in {idx[0], idx[len(idx) // 2], idx[-1]}:
            digest.update(images[i].tobytes())
        first = seen.setdefault(digest.hexdigest(), patient)
        if first != patient:
            raise UserError(
                f"patients {first} and {patient} hold the same slices (a copy under another name?): "
                "remove one, or the split could test one and train on the other"
            )


SPLIT_FLAGS = ("split", "seed", "val_frac", "test_frac", "folds", "fold", "test_fold")


def split_key(kind):
    """How split.json names a slice's unit: its patient, or with --split slice "<patient>_<number>"."""
    return (lambda s: s.patient) if kind == "patient" else (lambda s: f"{s.patient}_{s.n}")


def split_from_record(slices, record, allow_missing=False):
    """The split a run recorded in its split.json, on the slices found now: the record is the truth
    for everything that uses the run. Returns (parts, notes); data that no longer match the record
    are a UserError, or with allow_missing a note (and evaluated on what is left)."""
    key = split_key(record["split"])
    side = {k: name for name in ("train", "val", "test") for k in record[name]}
    parts = {name: [] for name in ("train", "val", "test")}
    for i, s in enumerate(slices):
        if key(s) in side:
            parts[side[key(s)]].append(i)
    unit = "patients" if record["split"] == "patient" else "slices"
    missing = sorted(set(side) - {key(s) for s in slices})
    changed = [f"{name} has {len(parts[name])} slices, split.json {record[name + '_slices']}"
               for name in parts if len(parts[name]) != record[name + "_slices"]]  # fmt: skip
    notes = []
    if missing:
        notes.append(f"{len(missing)} {unit} of split.json are not in the data ({', '.join(missing[:3])}"
                     + (", ..." if len(missing) > 3 else "") + ")")  # fmt: skip
    elif changed:
        notes.append("; ".join(changed))
    if notes and not allow_missing:
        raise UserError(f"the data no longer match the run's split.json: {notes[0]}; restore them, or pass "
                        "--allow-missing to use what is left")  # fmt: skip
    extra = len({key(s) for s in slices} - set(side))
    if extra:
        notes.append(f"{extra} {unit} in the data are not in split.json: left out")
    return parts, notes
