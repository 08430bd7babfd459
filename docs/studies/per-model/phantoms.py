"""SegNet's stall on phantoms, over seeds: the table of "The cause" in this study's README.

Each network at quarter width trains 24 Adam steps at 1e-3 under bce+dice on phantom slices (the
probe of tests/test_models.py): U-Net and FCN-8s as PyTorch starts them (p ~ 0.5 everywhere),
SegNet with its output bias at 0 (p = 0.5) and as segnet/model.py starts it (the foreground's
prior). Per seed: found (share of tumour pixels above logit 0), gap (mean tumour logit minus mean
background logit), and for SegNet the spread over a slice's pixels of the decoder's last features
and of the output (a flat decoder is the stall).

    python docs/studies/per-model/phantoms.py [--seeds 6] > docs/studies/per-model/phantoms.txt
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_models import phantom_batches, trained_on_phantoms  # noqa: E402

from common.cli import Parser  # noqa: E402
from common.errors import contract  # noqa: E402
from common.ranges import count  # noqa: E402
from fcn.model import FCN8s  # noqa: E402
from segnet.model import PRIOR, SegNet  # noqa: E402
from unet.model import UNet  # noqa: E402


def spreads(model):
    """Mean over slices and channels of the pixel spread of the output layer's input and of its output."""
    head, seen = model.decoder[-1][-1], []
    hook = head.register_forward_hook(lambda module, inputs, out: seen.append((inputs[0], out)))
    with torch.no_grad():
        model(phantom_batches(0)[0][0])
    hook.remove()
    return [float(t.std((2, 3)).mean()) for t in seen[0]]


def trial(cls, seed, at_half):
    torch.manual_seed(seed)
    model = cls(width=0.25)
    if cls is SegNet and at_half:
        torch.nn.init.zeros_(model.decoder[-1][-1].bias)
    gap, found = trained_on_phantoms(model)
    return found, gap, spreads(model) if cls is SegNet else None


def probe(args):
    torch.set_num_threads(1)
    rows = [(SegNet, True, "p = 0.5"), (SegNet, False, f"the prior ({PRIOR})")]
    rows += [(UNet, True, "PyTorch's default, p ~ 0.5"), (FCN8s, True, "PyTorch's default, p ~ 0.5")]
    for cls, at_half, start in rows:
        print(f"{cls.__name__}, output started at {start}")
        for seed in range(args.seeds):
            found, gap, spread = trial(cls, seed, at_half)
            line = f"  seed {seed}: found {found:.2f}  gap {gap:5.2f}"
            if spread:
                line += f"  spread: decoder's last features {spread[0]:.2f}, output {spread[1]:.2f}"
            print(line, flush=True)


def parser():
    p = Parser(prog="python docs/studies/per-model/phantoms.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=count(), default=6, help="seeds 0 to N-1 for each network")
    return p


def main(argv=None):
    return contract(lambda argv: probe(parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
