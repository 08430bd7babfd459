"""Train FCN-8s (VGG16-BN encoder) on the LGG brain-MRI slices (kaggle_3m), or on phantoms with --synthetic.

    python fcn/train.py --synthetic
    accelerate launch --config_file accelerate_configs/4gpu.yaml fcn/train.py --data-dir data/kaggle_3m

The original study started from ImageNet weights: pass torchvision's vgg16_bn weights as a local
file with --pretrained (width 1.0); without it the encoder is randomly initialised (no download).
"""

import sys
from pathlib import Path

# the code beside this script, not that of another checkout `pip install -e` may have registered
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import in_channels, make_parser
from common.entry import main
from common.errors import UserError
from common.ranges import pathname

TITLE = "FCN-8s"


def build_model(args):
    if args.pretrained is not None and not args.pretrained.is_file():
        raise UserError(f"--pretrained: file not found: {args.pretrained}")
    # imported here, not above: torch takes seconds to import, and --help and flag errors should not wait
    from fcn.model import FCN8s

    try:
        return FCN8s(in_channels(args), 1, width=args.width, weights_path=args.pretrained)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"--pretrained {args.pretrained}: {e}") from e


def parser():
    p = make_parser(__file__, __doc__)
    p.add_argument(
        "--pretrained",
        type=pathname,
        default=None,
        help="local torchvision vgg16_bn state dict (ImageNet weights) for the encoder",
    )
    return p


if __name__ == "__main__":
    main(parser(), build_model)
