"""Train SegNet (VGG16-BN layout, max-unpooling decoder) on the LGG brain-MRI slices (kaggle_3m),
or on phantoms with --synthetic. Trained from scratch, as in the original study.

    python segnet/train.py --synthetic
    accelerate launch --config_file accelerate_configs/4gpu.yaml segnet/train.py --data-dir data/kaggle_3m
"""

import sys
from pathlib import Path

# the code beside this script, not that of another checkout `pip install -e` may have registered
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import in_channels, make_parser
from common.entry import main

TITLE = "SegNet"


def build_model(args):
    # imported here, not above: torch takes seconds to import, and --help and flag errors should not wait
    from segnet.model import SegNet

    return SegNet(in_channels(args), 1, width=args.width)


def parser():
    return make_parser(__file__, __doc__)


if __name__ == "__main__":
    main(parser(), build_model)
