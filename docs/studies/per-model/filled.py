"""A copy of a run's validation patients with their contrast sequences filled with FLAIR, as the
release fills them for the 10 of its 110 patients who lack one: the validation patients as those
patients come, for `--eval-only --allow-missing` (the other patients of the run's split are not
copied, and said so).

    python docs/studies/per-model/filled.py --data-dir data/kaggle_3m --split RUN/split.json \\
        --sequences both OUT_DIR
    python unet/train.py --eval-only --checkpoint RUN/best.pt --data-dir OUT_DIR --allow-missing --no-test
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import files  # noqa: E402
from common.cli import Parser  # noqa: E402
from common.errors import UserError, contract  # noqa: E402
from common.ranges import pathname  # noqa: E402

CHANNELS = {"post": [2], "both": [0, 2]}  # pre-contrast, FLAIR, post-contrast


def fill(args):
    patients = files.read_json(args.split).get("val") or []
    if not patients:
        raise UserError(f"--split {args.split}: no validation patients in it")
    for patient in patients:
        source, target = args.data_dir / patient, args.out_dir / patient
        if not source.is_dir():
            raise UserError(f"--data-dir {args.data_dir}: no folder {patient} (a patient of {args.split})")
        target.mkdir(parents=True, exist_ok=True)
        for tif in sorted(source.glob("*.tif")):
            image = np.asarray(Image.open(tif))
            if not tif.stem.endswith("_mask"):
                image = image.copy()
                image[..., CHANNELS[args.sequences]] = image[..., 1:2]
            Image.fromarray(image).save(target / tif.name)
    print(f"{len(patients)} patients, {args.sequences} filled with FLAIR, in {args.out_dir}")


def parser():
    p = Parser(prog="python docs/studies/per-model/filled.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=pathname, default="data/kaggle_3m", help="the kaggle_3m folder")
    p.add_argument(
        "--split", type=pathname, required=True, help="a run's split.json: its validation patients"
    )
    p.add_argument(
        "--sequences", choices=sorted(CHANNELS), default="both", help="the sequences FLAIR replaces"
    )
    p.add_argument("out_dir", type=pathname, help="the copy's folder (a kaggle_3m layout)")
    return p


def main(argv=None):
    return contract(lambda argv: fill(parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
