"""A run's last epoch as a checkpoint: its best.pt (flags, split) with the weights of its last/ state,
for `--eval-only --checkpoint` to score the epoch the contest keeps (a fold has no validation
patients to pick a best epoch by), where a study's tables score each run's best.pt.

    python docs/studies/per-model/last.py RUN_DIR OUT.pt
    python unet/train.py --eval-only --checkpoint OUT.pt --data-dir data/kaggle_3m --no-test
"""

import sys
from pathlib import Path

from accelerate.utils import load_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import files  # noqa: E402
from common.checkpoint import load_checkpoint, split_of  # noqa: E402
from common.cli import Parser  # noqa: E402
from common.errors import UserError, contract  # noqa: E402
from common.ranges import pathname  # noqa: E402


def last_checkpoint(args):
    weights = args.run / "last" / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{args.run}: no last/model.safetensors (a run folder of this repository)")
    ckpt = load_checkpoint(args.run / "best.pt")
    ckpt["split"] = split_of(args.run, ckpt)  # the run's split.json where best.pt predates carrying it
    ckpt["model"] = load_state_dict(str(weights))  # accelerate saves safetensors; it reads them back
    ckpt["epoch"] = len(files.read_jsonl(args.run / "metrics.jsonl"))
    ckpt["val"] = None  # scored afresh by --eval-only
    files.save_torch(ckpt, args.out)
    print(f"{args.out}: epoch {ckpt['epoch']} of {args.run}")


def parser():
    p = Parser(prog="python docs/studies/per-model/last.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=pathname, help="a run folder (best.pt, last/, metrics.jsonl)")
    p.add_argument("out", type=pathname, help="the checkpoint to write")
    return p


def main(argv=None):
    return contract(lambda argv: last_checkpoint(parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
