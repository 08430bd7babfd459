"""What a SegNet checkpoint of the comparison's fold 2 does on its training slices: channels that never
fire per conv-BN-ReLU layer, the mean logit on tumour and on background pixels with the running
batch-norm statistics and with each batch's own, the share of pixels predicted as tumour (and
truly tumour), and the Dice over those slices at the threshold (logit 0) and at lower ones: a
network that ranks tumour above background but holds it below the threshold scores far higher at a
lower one.

    python docs/studies/per-model/diagnose.py --data-dir data/kaggle_3m CHECKPOINT...

(the checkpoints of each epoch: best.pt of a --val-frac 0 run, copied after each epoch)
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common.checkpoint import load_checkpoint  # noqa: E402
from common.cli import Parser, parse  # noqa: E402
from common.errors import contract  # noqa: E402
from common.prepare import load_data, make_accelerator, network_inputs  # noqa: E402
from common.ranges import pathname  # noqa: E402
from segnet.model import SegNet  # noqa: E402
from segnet.train import parser as segnet_parser  # noqa: E402


def batches(data_dir, n=8):
    """n batches of fold 2's training slices (tumour-share sampled, as trained), not augmented."""
    flags = ["--data-dir", data_dir, "--preset", "cpu", "--folds", "5", "--test-fold", "2", "--val-frac", "0"]
    args = parse(segnet_parser(), flags)
    d = load_data(args, make_accelerator(args))
    out = []
    for images, masks, idx in d.loaders["train"]:
        out.append(network_inputs(args, d, images, masks, idx))
        if len(out) == n:
            return out


@torch.no_grad()
def logits(model, xs, train_mode):
    model.train(train_mode)  # train mode: each batch's own statistics (running ones updated: a copy)
    tumour, background, positive, outs = [], [], [], []
    for x, y in xs:
        out = model(x)
        tumour.append(out[y > 0.5].mean()), background.append(out[y < 0.5].mean())
        positive.append((out > 0).float().mean())
        outs.append(out)
    return [float(sum(v) / len(v)) for v in (tumour, background, positive)], torch.cat(outs)


def dice_at(out, y, thresholds=(0, -1, -2, -3, -4)):
    """Dice over all the slices' pixels, tumour predicted where the logit exceeds each threshold."""
    return {
        t: float(2 * ((out > t) & (y > 0.5)).sum() / ((out > t).sum() + (y > 0.5).sum())) for t in thresholds
    }


def parser():
    p = Parser(
        prog="python docs/studies/per-model/diagnose.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", type=pathname, default="data/kaggle_3m", help="the kaggle_3m folder")
    p.add_argument("checkpoints", nargs="+", type=pathname, help="SegNet best.pt files")
    return p


def main(argv=None):
    return contract(lambda argv: diagnose(parser().parse_args(argv)), argv)


def diagnose(a):
    xs = batches(str(a.data_dir))
    for path in a.checkpoints:
        ckpt = load_checkpoint(path, "segnet")
        model = SegNet(3, 1, width=ckpt["config"]["width"])
        model.load_state_dict(ckpt["model"])
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        fired = {}
        hooks = [
            r.register_forward_hook(
                lambda m, _, out: fired.update({m: fired.get(m, 0) + out.amax((0, 2, 3))})
            )
            for r in relus
        ]
        running, out = logits(model, xs, train_mode=False)
        for h in hooks:
            h.remove()
        own, _ = logits(model, xs, train_mode=True)
        dead = " ".join(f"{int((fired[r] == 0).sum())}/{len(fired[r])}" for r in relus)
        print(f"{path}\n  channels never firing, per layer: {dead}")
        for name, (t, b, pos) in (("running statistics", running), ("batch statistics", own)):
            print(f"  {name}: mean logit tumour {t:+.2f}, background {b:+.2f}; predicted tumour {pos:.2%}")
        y = torch.cat([y for _, y in xs])
        dice = ", ".join(f"{d:.3f} at logit {t}" for t, d in dice_at(out, y).items())
        print(f"  tumour {(y > 0.5).float().mean():.2%} of the pixels; Dice (running statistics) {dice}")


if __name__ == "__main__":
    sys.exit(main())
