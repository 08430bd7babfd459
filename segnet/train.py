"""Train SegNet (VGG16-BN layout, max-unpooling decoder) on the LGG brain-MRI slices (kaggle_3m),
or on phantoms with --synthetic. Trained from scratch, as in the original study.

    python segnet/train.py --synthetic
    accelerate launch --config_file accelerate_configs/4gpu.yaml segnet/train.py --data-dir data/kaggle_3m
"""
from common.cli import main, make_parser
from segnet.model import SegNet


def build_model(args):
    return SegNet(out_channels=1, width=args.width)


if __name__ == "__main__":
    main(make_parser("segnet", __doc__), build_model)
