"""The models, found from their folders, so that no tool lists them. A model is a top-level folder
holding model.py (the network) and train.py, which defines

    parser()          its flags: common.cli.make_parser(__file__, __doc__) plus its own; the own
                      flags that shape the network are named in set_defaults(network_flags=...)
    build_model(args) the network, meeting CONTRACT (checked by `check`)
    TITLE             (optional) its name in tables

and runs `common.entry.main(parser(), build_model)` as a script."""

import importlib
from pathlib import Path

import torch

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = (
    "takes --width (a channel multiplier) and a (B, 3, H, W) float batch, H and W multiples of 32; "
    "returns one tensor (B, 1, H, W) of tumour logits (a pixel is tumour where its logit > 0)"
)


def names():
    return sorted(p.parent.name for p in ROOT.glob("*/train.py") if (p.parent / "model.py").is_file())


def script(name):
    """The model's train.py module."""
    if name not in names():
        raise UserError(
            f"unknown model {name!r}: the models are {', '.join(names())} "
            "(folders with model.py and train.py)"
        )
    return importlib.import_module(f"{name}.train")


def title(name):
    """The model's name in tables: TITLE in its train.py, else its folder's name."""
    return getattr(script(name), "TITLE", name)


def model_args(config):
    """The flags of the model's train.py at their defaults, with `config` (model, width, ...) over them."""
    args = script(config["model"]).parser().parse_args([])
    vars(args).update(config)
    return args


def build(config):
    """The network a checkpoint's config (or any {model, width, image_size, ...}) describes."""
    return script(config["model"]).build_model(model_args(config))


def check(model, width=0.125):
    """Raise AssertionError unless `model` meets CONTRACT on a small batch."""
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor), f"the model returned {type(y).__name__}, not a tensor: {CONTRACT}"
    assert y.shape == (2, 1, 64, 96) and y.is_floating_point(), f"output {tuple(y.shape)}: {CONTRACT}"
