"""Command-line flags shared by every train.py, and their checks."""

import argparse
import copy
import os
import sys
from pathlib import Path

from common import pipelines
from common.errors import UserError, no_data
from common.ranges import amount, count, image_size, pathname, positive, seed, share


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


# recipes as files a reader can diff: configs/<name>.toml (`--preset name`) or any .toml file; each key
# a flag, a table [<model>] that model's own values (chosen on validation patients) over the shared
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# flags a user rarely sets per run, out of --help (--help-all shows them): the recipe's knobs, which a
# --preset file sets, and those of benchmarks and of the original's protocol
HIDDEN = {
    "context", "normalize", "crop", "pin_memory", "split", "optimizer", "weight_decay", "schedule",
    "warmup", "flip", "rotate", "scale", "tumour_share", "loss", "postprocess", "max_steps", "no_eval",
    "step_timing", "sync_bn", "log_with", "allow_missing", "train_seed",
}  # fmt: skip


def preset_names():
    return sorted(p.stem for p in CONFIGS.glob("*.toml"))


def preset_values(parser, preset):
    """{dest: value} of a recipe file (a name in configs/ or a path): its shared keys, then those of
    its table for this parser's model, each read as its flag would be (one line naming the file)."""
    import tomllib

    path = Path(preset) if preset.endswith(".toml") else CONFIGS / f"{preset}.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(
            f"argument --preset: no recipe {path} (a name from {', '.join(preset_names())}, or a .toml file)"
        ) from e
    except (OSError, ValueError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"--preset {path}: not a TOML file ({e})") from e
    model = parser.get_default("model")
    values = {k: v for k, v in raw.items() if not isinstance(v, dict)} | raw.get(model, {})
    tokens = []
    for key, value in values.items():
        if value is True:
            tokens.append(f"--{key}")
        elif value is not False:
            tokens += [f"--{key}", str(value)]
    try:
        return explicit_flags(parser, tokens)
    except UserError as e:
        raise UserError(f"--preset {path}: {e}") from e


class HelpAll(argparse.Action):
    """--help-all: --help with the flags HIDDEN keeps out of it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for action in parser._actions:
            action.help = getattr(action, "full_help", action.help)
        parser.print_help()
        parser.exit()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the description's usage examples kept as written."""


def make_parser(script, description, **defaults):
    """The flags every <model>/train.py shares; `script` is its __file__, whose folder names the model."""
    model = Path(script).resolve().parent.name
    p = Parser(prog=f"{model}/train.py", description=description, formatter_class=HelpFormatter)
    p.set_defaults(model=model)
    for add in (data_flags, input_flags, split_flags, augmentation_flags, training_flags, objective_flags):
        add(p)
    speed_flags(p), run_flags(p), evaluation_flags(p)
    p.add_argument("--help-all", action=HelpAll, help="show every flag: also the recipe's (a --preset file "
                   "sets them), those of benchmarks and of the original's protocol")  # fmt: skip
    for action in p._actions:
        if action.dest in HIDDEN:
            action.full_help, action.help = action.help, argparse.SUPPRESS
    p.set_defaults(network_flags=(), **defaults)  # a model's own flags that shape its network
    return p


def default_cache_dir():
    return Path(os.environ.get("LGG_CACHE_DIR", Path.home() / ".cache" / "lgg-seg"))


def data_flags(p):
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        type=pathname,
        default=Path(os.environ.get("LGG_DATA_DIR", "data/kaggle_3m")),
        help="the kaggle_3m folder (one sub-folder per patient); default $LGG_DATA_DIR",
    )
    d.add_argument(
        "--synthetic",
        action="store_true",
        help="train on a generated phantom dataset (written once into the cache); implies --preset quick",
    )
    d.add_argument(
        "--cache-dir",
        type=pathname,
        default=default_cache_dir(),
        help="where decoded slices (and the phantoms) are kept; default $LGG_CACHE_DIR",
    )
    d.add_argument(
        "--image-size",
        type=image_size(),
        default=256,
        help="resize slices to this many pixels (multiple of 32)",
    )
    d.add_argument(
        "--data-pipeline",
        choices=tuple(pipelines.PIPELINES),
        default="cached",
        help="; ".join(f"{k}: {v}" for k, v in pipelines.PIPELINES.items()),
    )
    d.add_argument(
        "--num-workers",
        type=count(0),
        default=0,
        help=f"DataLoader workers per process ({', '.join(pipelines.WORKERS)})",
    )
    d.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"pinned host memory for batches ({', '.join(pipelines.WORKERS)}); default: on with CUDA",
    )


def input_flags(p):
    d = p.add_argument_group("inputs: what the network sees of each slice")
    d.add_argument(
        "--context",
        type=count(0),
        default=0,
        help="2.5-D: feed each slice with its K neighbours on each side (same patient; edges repeated) "
        "as extra input channels, 3 x (2K + 1) in all",
    )
    d.add_argument(
        "--normalize",
        choices=("slice", "volume"),
        default="slice",
        help="intensities z-scored per slice and channel, or per patient volume (clipped to its 10th-99th "
        "percentile, then each channel's mean and std: Buda et al.)",
    )
    d.add_argument(
        "--crop",
        choices=("none", "brain"),
        default="none",
        help="brain: each patient's slices cut to a square around the FLAIR signal before resizing "
        "(predictions are put back in place for scoring)",
    )


def split_flags(p):
    d = p.add_argument_group("patients: which train, validate and test")
    d.add_argument(
        "--split",
        choices=("patient", "slice"),
        default="patient",
        help="'slice' reproduces the original's leaky split: for comparison only",
    )
    d.add_argument(
        "--val-frac", type=share(), default=0.2, help="share of patients (or slices) for validation"
    )
    d.add_argument("--test-frac", type=share(), default=0.1, help="share held out for the final test")
    d.add_argument(
        "--folds",
        type=count(2, zero="no folds"),
        default=0,
        help="cross-validation: split the non-test patients into this many folds "
        "(stratified by tumour slices)",
    )
    d.add_argument("--fold", type=count(0), default=0, help="with --folds: the fold that validates")
    d.add_argument(
        "--test-fold",
        type=count(0),
        default=None,
        help="with --folds: outer cross-validation, every patient dealt into the folds and this one "
        "tested; --val-frac of the patients, from the other folds, validate (0: none, the last epoch "
        "is kept)",
    )


def augmentation_flags(p):
    a = p.add_argument_group("augmentation (on the training device, training batches only)")
    a.add_argument("--flip", type=share(closed=True), default=0.5, help="probability of a horizontal flip")
    a.add_argument("--rotate", type=amount(unit="degrees"), default=15.0, help="max rotation in degrees")
    a.add_argument("--scale", type=share(), default=0.05, help="max relative zoom")
    a.add_argument(
        "--fill-flair",
        type=share(closed=True),
        default=0.0,
        help="probability that a slice gets FLAIR for its post-contrast sequence (half of those: for its"
        " pre-contrast one too), as the release fills the sequences 10 of its 110 patients lack",
    )


def training_flags(p):
    t = p.add_argument_group("training")
    t.add_argument(
        "--preset",
        default=None,
        help=f"a recipe file: configs/NAME.toml ({', '.join(preset_names())}) or a .toml path; its "
        "values (the model's own table over the shared ones) apply to the flags not given",
    )
    t.add_argument(
        "--width", type=positive(), default=1.0, help="channel multiplier (1.0 = the published model)"
    )
    t.add_argument(
        "--epochs", type=count(1), default=30, help="epochs in all (with --resume: up to this one)"
    )
    t.add_argument(
        "--batch-size", type=count(1), default=16, help="per process; the global batch is this x processes"
    )
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="sgd: with momentum 0.9")
    t.add_argument("--lr", type=positive(), default=1e-4, help="learning rate")
    t.add_argument("--weight-decay", type=amount(), default=0.0)
    t.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="cosine: linear warm-up over --warmup of the steps, then a cosine decay to 0, per step "
        "(+0.19 validation Dice at the CPU preset: docs/studies/stronger-recipe); constant: --lr throughout",
    )
    t.add_argument("--warmup", type=share(), default=0.05, help="with --schedule cosine: share of the steps")
    t.add_argument(
        "--budget",
        type=amount("none", "seconds"),
        default=0,
        help="seconds: train for about this long, the cosine spanning the epochs that fit (estimated "
        "from the first epoch, validation included); --epochs is then the most (0: --epochs decides)",
    )


def objective_flags(p):
    t = p.add_argument_group("recipe: what each epoch draws, what is minimised, what is kept")
    t.add_argument(
        "--tumour-share",
        type=share(),
        default=0,
        help="draw this share of each epoch's training slices from those with tumour (with replacement; "
        "an epoch stays as many draws as training slices; 0: each slice once, shuffled)",
    )
    t.add_argument(
        "--loss",
        choices=("bce+dice", "bce", "dice"),
        default="bce+dice",
        help="bce: binary cross-entropy over pixels; dice: soft Dice pooled over the batch "
        "(docs/studies/loss)",
    )
    t.add_argument(
        "--postprocess",
        choices=("none", "lcc", "auto"),
        default="auto",
        help="the predicted volumes of the final evaluation: as predicted, the largest 3-D component "
        "kept, or auto: the best of those and dropping components under 8/32/128 voxels on the "
        "validation patients (the test patients' are reported both as predicted and so)",
    )


def speed_flags(p):
    f = p.add_argument_group("speed")
    f.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="default: the accelerate config's",
    )
    f.add_argument(
        "--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)"
    )
    f.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    f.add_argument("--sync-bn", action="store_true", help="batch-norm statistics over all processes")
    f.add_argument(
        "--threads",
        type=count(1, zero="automatic"),
        default=0,
        help="CPU threads per process; 0: the cores this process may use / processes on this machine",
    )
    f.add_argument(
        "--max-steps",
        type=count(1, zero="whole epochs"),
        default=0,
        help="stop each epoch after this many steps (benchmarks; 0: whole epochs)",
    )
    f.add_argument(
        "--no-eval",
        action="store_true",
        help="timing runs: no validation, test or checkpoint (summary.json and metrics.jsonl only)",
    )
    f.add_argument(
        "--step-timing",
        action="store_true",
        help="synchronise the device around every step to split data wait from compute "
        "(free on a CPU, which is always timed so; costs a little on a GPU)",
    )


def run_flags(p):
    r = p.add_argument_group("run")
    r.add_argument(
        "--seed", type=seed(), default=0, help="seeds the split, and the training unless --train-seed"
    )
    r.add_argument(
        "--train-seed",
        type=seed(),
        default=None,
        help="seeds the weights, augmentation and batch order only: runs on one split (ensemble members)",
    )
    r.add_argument(
        "--time-limit",
        type=amount("none", "seconds"),
        default=0,
        help="seconds: start no epoch that would end past this (0: none); for job and lease limits",
    )
    r.add_argument(
        "--output-dir", type=pathname, default=None, help="run folder; default runs/<model>-<time>"
    )
    r.add_argument(
        "--resume",
        type=pathname,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its saved flags, unless given again)",
    )
    r.add_argument(
        "--log-with",
        choices=("tensorboard",),
        default=None,
        help="also log the per-epoch metrics with this Accelerate tracker (into the run folder)",
    )
    r.add_argument("--debug", action="store_true", help="show tracebacks")


def evaluation_flags(p):
    r = p.add_argument_group("evaluation")
    r.add_argument(
        "--eval-only", action="store_true", help="evaluate --checkpoint on the validation and test sets"
    )
    r.add_argument(
        "--checkpoint",
        type=pathname,
        default=None,
        help="a best.pt file, a run folder holding one, or a folder of such runs (e.g. --folds runs or "
        "seeds): their ensemble",
    )
    r.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation in the final evaluation: mean probability of each slice and its mirror",
    )
    r.add_argument(
        "--no-test",
        action="store_true",
        help="leave the test patients unevaluated (while choosing a recipe on validation patients)",
    )
    r.add_argument(
        "--allow-missing",
        action="store_true",
        help="--resume, --eval-only: go on when data of the run's split.json are missing (said; left out)",
    )


def named(args, key):
    """A flag as an error names it: with its value and its source where a preset set it, since the
    user never typed it."""
    flag = "--" + key.replace("_", "-")
    if key in getattr(args, "given", ()) or not getattr(args, "preset", None):
        return flag
    return f"{flag} {getattr(args, key)} (of --preset {args.preset})"


def in_channels(args):
    """Input channels of the network: RGB of the slice and of its --context neighbours."""
    return 3 * (2 * getattr(args, "context", 0) + 1)


def parse_with_train_flags(parser, argv=None):
    """(args, flags) for commands that pass what follows `--` to <model>/train.py."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:cut]), argv[cut + 1 :]


def explicit_flags(parser, argv):
    """The flags the user actually gave, with their values (defaults left out)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def parse(parser, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    preset = args.preset or ("quick" if args.synthetic else None)
    for k, v in (preset_values(parser, preset) if preset else {}).items():
        if k not in given:
            setattr(args, k, v)
    args.given = sorted(given)
    check(args)
    return args


def check(args):
    def need(ok, flag, msg):
        if not ok:
            raise UserError(f"argument {flag}: {msg}")

    need(
        args.data_pipeline in pipelines.WORKERS or args.num_workers == 0,
        "--num-workers",
        f"must be 0 with --data-pipeline {args.data_pipeline} (batches are cut on the training device)",
    )
    need(
        args.val_frac > 0 or not args.no_eval,
        "--val-frac",
        "0 (no validation) with --no-eval leaves nothing to evaluate",
    )
    need(args.folds or "fold" not in args.given, "--fold", "needs --folds K: the folds it is one of")
    need(
        args.folds == 0 or 0 <= args.fold < args.folds,
        "--fold",
        f"must be in 0..{args.folds - 1}, got {args.fold}",
    )
    if args.test_fold is not None:
        need(args.folds >= 2, "--test-fold", "needs --folds K (K >= 2): the folds it is one of")
        need(
            0 <= args.test_fold < args.folds,
            "--test-fold",
            f"must be in 0..{args.folds - 1}, got {args.test_fold}",
        )
        need("fold" not in args.given, "--test-fold", "with --fold: a fold either validates or is tested")
    need(
        args.val_frac + args.test_frac < 1,
        "--val-frac/--test-frac",
        f"leave something to train on: {args.val_frac} + {args.test_frac} >= 1",
    )
    need(
        args.context == 0 or args.data_pipeline != "decode",
        "--context",
        "needs --data-pipeline cached or device (neighbours come from the cache)",
    )
    need(
        args.budget == 0 or args.schedule == "cosine", "--budget", "spans the cosine: needs --schedule cosine"
    )
    if args.eval_only:
        need(args.checkpoint is not None, "--checkpoint", "is required with --eval-only")
    if args.checkpoint is not None:
        need(args.eval_only, "--checkpoint", "only with --eval-only (to continue a run: --resume RUN_DIR)")
        need(args.checkpoint.exists(), "--checkpoint", f"not found: {args.checkpoint}")
    if args.resume is not None:
        need(args.resume.is_dir(), "--resume", f"not a run folder: {args.resume}")
    if args.output_dir is not None:
        need(
            not args.output_dir.exists() or args.output_dir.is_dir(),
            "--output-dir",
            f"exists and is not a folder: {args.output_dir}",
        )
    # last: a flag error is the same with or without the data (a fresh clone has none), and before
    # torch is imported; --resume reads its own (saved), --eval-only its checkpoint's first
    if not (args.synthetic or args.eval_only) and (args.resume is None or "data_dir" in args.given):
        if not args.data_dir.exists():
            raise no_data(args.data_dir)
