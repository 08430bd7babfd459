"""What a SegNet checkpoint of the comparison's fold 2 does on its training slices: channels that never
fire per conv-BN-ReLU layer, the mean logit on tumour and on background pixels with the running
batch-norm statistics and with each batch's own, and the share of pixels predicted as tumour.

    python docs/studies/per-model/diagnose.py --data-dir data/kaggle_3m CHECKPOINT...

(the checkpoints of each epoch: best.pt of a --val-frac 0 run, copied after each epoch)
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common.cli import parse  # noqa: E402
from common.evaluate import inputs  # noqa: E402
from common.prepare import load_data, make_accelerator  # noqa: E402
from segnet.model import SegNet  # noqa: E402
from segnet.train import parser  # noqa: E402


def batches(data_dir, n=8):
    """n batches of fold 2's training slices (tumour-share sampled, as trained), not augmented."""
    flags = ["--data-dir", data_dir, "--preset", "cpu", "--folds", "5", "--test-fold", "2", "--val-frac", "0"]
    args = parse(parser(), flags)
    d = load_data(args, make_accelerator(args))
    out = []
    for images, masks, idx in d.loaders["train"]:
        out.append(inputs(args, d, images, masks, idx))
        if len(out) == n:
            return out


@torch.no_grad()
def logits(model, xs, train_mode):
    model.train(train_mode)  # train mode: each batch's own statistics (running ones updated: a copy)
    tumour, background, positive = [], [], []
    for x, y in xs:
        out = model(x)
        tumour.append(out[y > 0.5].mean()), background.append(out[y < 0.5].mean())
        positive.append((out > 0).float().mean())
    return [float(sum(v) / len(v)) for v in (tumour, background, positive)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/kaggle_3m")
    p.add_argument("checkpoints", nargs="+")
    a = p.parse_args()
    xs = batches(a.data_dir)
    for path in a.checkpoints:
        model = SegNet(3, 1, width=0.25)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        fired = {}
        hooks = [
            r.register_forward_hook(
                lambda m, _, out: fired.update({m: fired.get(m, 0) + out.amax((0, 2, 3))})
            )
            for r in relus
        ]
        running = logits(model, xs, train_mode=False)
        for h in hooks:
            h.remove()
        own = logits(model, xs, train_mode=True)
        dead = " ".join(f"{int((fired[r] == 0).sum())}/{len(fired[r])}" for r in relus)
        print(f"{path}\n  channels never firing, per layer: {dead}")
        for name, (t, b, pos) in (("running statistics", running), ("batch statistics", own)):
            print(f"  {name}: mean logit tumour {t:+.2f}, background {b:+.2f}; predicted tumour {pos:.2%}")


if __name__ == "__main__":
    main()
