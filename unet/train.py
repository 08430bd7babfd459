"""Train U-Net on the LGG brain-MRI slices (kaggle_3m), or on generated phantoms with --synthetic.

    python unet/train.py --synthetic                      # quick CPU check, about two minutes
    accelerate launch --config_file accelerate_configs/4gpu.yaml unet/train.py --data-dir data/kaggle_3m

The original U-Net (64..1024 channels, 34.5 M parameters at --width 1.0) trained from scratch, or,
with --encoder, segmentation-models-pytorch's U-Net on that encoder (resnet34, or a timm encoder
such as tu-convnext_tiny), randomly initialised: nothing is downloaded.
"""

import sys
from pathlib import Path

# the code beside this script, not that of another checkout `pip install -e` may have registered
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import in_channels, make_parser
from common.entry import main
from common.errors import UserError

TITLE = "U-Net"


def build_model(args):
    if args.encoder:
        try:  # only this variant needs it
            import segmentation_models_pytorch as smp
        except ImportError as e:
            raise UserError(
                f"--encoder needs segmentation-models-pytorch ({e}): pip install segmentation-models-pytorch"
            ) from e
        try:
            return smp.Unet(args.encoder, encoder_weights=None, in_channels=in_channels(args), classes=1)
        except (KeyError, ValueError) as e:
            raise UserError(
                f"--encoder {args.encoder}: not an encoder segmentation-models-pytorch knows"
            ) from e
    # imported here, not above: torch takes seconds to import, and --help and flag errors should not wait
    from unet.model import UNet

    return UNet(in_channels(args), 1, width=args.width)


def parser():
    p = make_parser(__file__, __doc__)
    p.add_argument(
        "--encoder",
        default=None,
        help="segmentation-models-pytorch encoder (e.g. resnet34); --width then does not apply",
    )
    p.set_defaults(network_flags=("encoder",))
    return p


if __name__ == "__main__":
    main(parser(), build_model)
