"""Export a trained model to ONNX or TorchScript, and check that the file gives the model's logits.

    python -m tools.export --checkpoint runs/unet-x --format onnx
    python -m tools.export --checkpoint runs/segnet-y/best.pt --format torchscript --data-dir data/kaggle_3m

The network is exported in eval mode, in fp32, on the CPU. Its input is a (B, C, S, S) float batch
prepared as in training, S the run's --image-size, B free; its output (B, 1, S, S) tumour logits
(tumour where > 0). How to prepare it is the model's own (--normalize, --crop, --context): printed,
and written beside the file as <file>.json (preprocessing()), so that it travels with the model.

Before the file takes its name it is run (onnxruntime for ONNX, torch.jit.load for TorchScript) on
a batch, and its logits are compared with PyTorch's: exit 1, and no file, if they differ by more
than --atol. The batch: slices of --data-dir (through the decoded cache, as training reads them),
else a fixed-seed random one. Without onnxruntime an ONNX file is only checked by onnx.checker.
TorchScript (torch.jit.trace) is deprecated by PyTorch, but its files run without the model's code.
SegNet's ONNX file can fail the check on real slices (its max-unpooling follows an argmax of
near-equal values, which onnxruntime's rounding can tip); its TorchScript file passes.
"""

import argparse
import logging
import os
import shutil
import sys
import warnings
from unittest import mock

import numpy as np
import torch

from common import data, files, report
from common.cache import open_dataset
from common.cli import Parser, default_cache_dir
from common.errors import UserError, contract, discard
from common.inference import load_model
from common.ranges import count, image_size, pathname, positive

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts.pt"}  # format -> default file name
ONNX_PIP = "pip install onnx onnxscript onnxruntime"
# why a model with max-unpooling (SegNet) can fail the check on real slices though its graph is right
TIES = (
    " (max-unpooling puts each value at its pooling window's argmax; where a window's two largest values"
    " are equal or within rounding of each other, as in a slice's flat background, the runtime's own"
    " rounding can pick the other; a torchscript export keeps PyTorch's kernels)"
)


class ExportFailed(UserError):
    """The model did not export, or the file does not give its logits: one line, exit 1."""

    exit_code = 1


def parser():
    p = Parser(
        prog="python -m tools.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", type=pathname, required=True, help="a run folder (its best.pt) or a .pt file"
    )
    p.add_argument("--format", choices=sorted(FORMATS), required=True)
    p.add_argument("--output", type=pathname, help="default: model.onnx or model.ts.pt beside the checkpoint")
    p.add_argument("--image-size", type=image_size(), help="default: the run's (its checkpoint's)")
    p.add_argument(
        "--data-dir", type=pathname, help="check on slices of this kaggle_3m folder, not random ones"
    )
    p.add_argument(
        "--cache-dir",
        type=pathname,
        default=default_cache_dir(),
        help="where --data-dir's decoded slices are kept (default: $LGG_CACHE_DIR or %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=count(1), default=4, help="slices in the checking batch (default: %(default)s)"
    )
    p.add_argument(
        "--atol",
        type=positive(),
        default=1e-4,
        help="largest |logit difference| allowed (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    return contract(lambda argv: run(parser().parse_args(argv)), argv)


def run(args):
    model, config = load(args.checkpoint)
    name, size = config["model"], args.image_size or config["image_size"]
    if size <= 0 or size % 32:
        raise UserError(f"--image-size {size}: must be a positive multiple of 32")
    folder = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    out = args.output or folder / FORMATS[args.format]
    writable_folder(out)
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    x, source = check_batch(args, channels, size)
    with torch.no_grad():
        expected = model(x)
    # traced or exported at batch 2 and checked at --batch-size: the check also shows B is free
    example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    export = export_onnx if args.format == "onnx" else export_torchscript
    room(out, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    diff = write_checked(
        out,
        lambda tmp: export(model, name, example, tmp),
        lambda tmp: compare(args.format, tmp, x, expected, args.atol, model, name),
    )
    mib = out.stat().st_size / 2**20
    prep = preprocessing(config, size)
    files.write_json(out.with_name(out.name + ".json"), prep)
    report.console.print(
        f"wrote {out} ({mib:.1f} MiB): {name} for ({channels}, {size}, {size}) inputs, any batch; "
        f"inputs: {prep['inputs']} (also in {out.name}.json)"
    )
    if diff is None:
        report.console.print(f"logits not compared: onnxruntime is not installed ({ONNX_PIP})")
    else:
        report.console.print(
            f"checked on {source}: max |logit difference| {diff:.2e} (--atol {args.atol:g}) "
            f"on logits of std {expected.std():.3g}"
        )


def preprocessing(config, size):
    """What the exported network's input must be, from the flags it was trained with."""
    steps = []
    if config.get("crop", "none") == "brain":
        steps.append(
            "each patient's slices cut to one square around the FLAIR signal (above a tenth of its "
            "maximum over the volume; common.data.brain_box), the logits pasted back there"
        )
    steps.append(f"resized to {size} x {size} (bilinear)")
    if config.get("normalize", "slice") == "volume":
        steps.append(
            "each channel clipped to its patient volume's 10th-99th percentile, then z-scored with "
            "the volume's mean and std (common.cache.volume_stats)"
        )
    else:
        steps.append("each slice's channels z-scored on their own (mean 0, std 1)")
    k = config.get("context", 0)
    if k:
        steps.append(f"the slice's {k} neighbours on each side stacked as channels, edges repeated")
    return {
        "model": config["model"],
        "image_size": size,
        "normalize": config.get("normalize", "slice"),
        "crop": config.get("crop", "none"),
        "context": k,
        "inputs": "; ".join(steps),
        "outputs": "tumour logits, tumour where > 0",
    }


def load(path):
    """(model in eval mode on the CPU, its config) of a run folder or a .pt file."""
    if not (path / "best.pt" if path.is_dir() else path).exists():
        raise UserError(f"--checkpoint {path}: {'no best.pt in it' if path.is_dir() else 'no such file'}")
    try:
        return load_model(path, "cpu")
    except RuntimeError as e:  # load_state_dict: weights of another shape, or of another network
        raise UserError(f"--checkpoint {path}: weights do not fit its network ({first_line(e)})") from e


def first_line(e):
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def writable_folder(out):
    """The output's folder exists (made if need be) and takes files: said before a long export."""
    if out.is_dir():
        raise UserError(f"--output {out}: is a folder (give a file name)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {out}: cannot make its folder ({e.strerror or e})") from e
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: cannot write in {out.parent}")


def check_batch(args, channels, size):
    """(inputs, what they are): --data-dir's slices spread over the whole set, or seeded noise."""
    if args.data_dir is None:
        x = torch.randn(args.batch_size, channels, size, size, generator=torch.Generator().manual_seed(0))
        return x, "a random batch (seed 0)"
    if channels != 3:
        raise UserError(f"--data-dir: the model takes {channels} channels (--context): leave --data-dir out")
    _, cache = open_dataset(args.data_dir, args.cache_dir, size, progress=True)
    picks = np.unique(np.linspace(0, len(cache.images) - 1, args.batch_size).round().astype(int))
    x, _ = data.to_inputs(torch.from_numpy(cache.images[picks]), torch.from_numpy(cache.masks[picks]))
    return x, f"{len(picks)} slices of {args.data_dir}"


def room(out, weights):
    """The file holds the weights and a little more: refused here on a disk without room for them,
    since the TorchScript writer aborts the process from C++ on a full disk (no error to catch)."""
    need, free = int(weights * 1.2) + 2**20, shutil.disk_usage(out.parent).free
    if free < need:
        raise UserError(f"--output {out}: {need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free there")


def write_checked(out, export, check):
    """export(tmp), check(tmp), then tmp renamed to `out`: a failed or wrong export leaves no file,
    not even half of one, and an older `out` stays as it was."""
    tmp = files.tmp_name(out)
    try:
        export(tmp)
        result = check(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        discard(tmp)
    return result


def compare(fmt, path, x, expected, atol, model, name):
    """Max |difference| of the file's logits from PyTorch's (None: not run); ExportFailed if too large."""
    got = run_onnx(path, x) if fmt == "onnx" else run_torchscript(path, x)
    if got is None:
        return None
    if got.shape != expected.shape:
        raise ExportFailed(f"the {fmt} {name} returns {tuple(got.shape)}, not {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if not diff <= atol:  # NaN fails too
        flips = ((got > 0) != (expected > 0)).sum().item()
        ties = any(isinstance(m, torch.nn.MaxUnpool2d) for m in model.modules())
        raise ExportFailed(
            f"the {fmt} {name}'s logits differ from PyTorch's by up to {diff:.2e} (> --atol {atol:g}); "
            f"its masks (logit > 0) differ on {flips} of {got.numel()} pixels: not written"
            + (TIES if ties else "")
        )
    return diff


def export_onnx(model, name, example, path):
    try:  # torch.onnx's exporter (torch.export based) needs both
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"--format onnx needs the onnx and onnxscript packages ({e}): {ONNX_PIP}") from e
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # its notes on the exporter's own internals
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    except Exception as e:  # the exporter raises many kinds; the reason is in the first line
        raise ExportFailed(f"{name} cannot be exported to ONNX: {first_line(e)}") from e
    program.save(str(path), external_data=False)  # one file: the weights inside (models < 2 GB)


def export_torchscript(model, name, example, path):
    # torch >= 2.13's max_unpool2d checks its output size with torch._check_value, which refuses the
    # sizes torch.jit.trace passes (Tensors), so SegNet would not trace (pytorch/pytorch#189298).
    # The check only refuses negative sizes, which pooling's own sizes never are.
    skip_unpool_check = mock.patch.object(
        torch.nn.functional, "_check_unpool_output_size", lambda *a: None, create=True
    )
    try:
        with warnings.catch_warnings(), skip_unpool_check, torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation, and tracer notes the check covers
            traced = torch.jit.trace(model, example)
    except Exception as e:
        raise ExportFailed(f"{name} cannot be exported to TorchScript: {first_line(e)}") from e
    traced.save(str(path))


def run_onnx(path, x):
    """The ONNX file's logits for x, or None without onnxruntime (then onnx.checker checks the file)."""
    try:
        import onnxruntime
    except ImportError:
        import onnx

        onnx.checker.check_model(str(path))
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def run_torchscript(path, x):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
        return torch.jit.load(str(path), map_location="cpu")(x)


if __name__ == "__main__":
    sys.exit(main())
