import pytest
import torch
from torchvision.models import vgg16_bn

from fcn.model import FCN8s
from segnet.model import SegNet
from unet.model import UNet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("model", [UNet, FCN8s, SegNet])
def test_one_logit_per_pixel_at_width_0125(model):
    net = model(width=0.125)
    assert net(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)


@pytest.mark.parametrize("model, millions", [(UNet, 34.52), (FCN8s, 20.10), (SegNet, 29.44)])
def test_parameters_at_width_1(model, millions):
    assert n_params(model(width=1.0)) / 1e6 == pytest.approx(millions, abs=0.01)


def test_width_shrinks_the_model():
    assert n_params(UNet(width=0.25)) < n_params(UNet(width=0.5)) / 3


@pytest.mark.slow
def test_fcn_loads_local_vgg16_bn_weights(tmp_path):
    reference = vgg16_bn(weights=None)
    torch.save(reference.state_dict(), tmp_path / "vgg16_bn.pth")
    net = FCN8s(weights_path=tmp_path / "vgg16_bn.pth")
    first_conv = net.stages[0][0]
    assert torch.equal(first_conv.weight, reference.features[0].weight)


def test_fcn_refuses_weights_at_another_width(tmp_path):
    torch.save(vgg16_bn(weights=None).state_dict(), tmp_path / "vgg16_bn.pth")
    with pytest.raises(ValueError, match="width 1.0"):
        FCN8s(width=0.5, weights_path=tmp_path / "vgg16_bn.pth")


def test_unet_with_an_smp_encoder_builds_without_download():
    pytest.importorskip("segmentation_models_pytorch")
    from argparse import Namespace

    from unet.train import build_model

    net = build_model(Namespace(encoder="resnet18", width=1.0))
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_segnet_unpools_each_stage_at_its_own_encoder_indices():
    """Ruling out a defect behind SegNet's slow start: decoder stage i must put values back where
    encoder stage 4-i found its maxima, at that stage's size."""
    net = SegNet(width=0.125).eval()
    pooled, unpooled = [], []
    pool_forward, unpool_forward = net.pool.forward, net.unpool.forward
    net.pool.forward = lambda x: pooled.append((x, *pool_forward(x))) or pooled[-1][1:]
    net.unpool.forward = lambda x, idx, output_size=None: (
        unpooled.append((x, idx, unpool_forward(x, idx, output_size=output_size))) or unpooled[-1][2]
    )
    net(torch.randn(2, 3, 64, 64))
    assert len(pooled) == len(unpooled) == 5
    for (before, _, idx), (x, idx_used, out) in zip(pooled, reversed(unpooled)):
        assert idx_used is idx and out.shape == before.shape
        # every decoder value lands at the position of its encoder maximum; all else is 0
        assert torch.equal(out.flatten(2).gather(2, idx.flatten(2)), x.flatten(2))
        placed = torch.zeros_like(before).flatten(2).scatter_(2, idx.flatten(2), 1).view_as(before).bool()
        assert not out[~placed].any()


def phantom_batches(seed, n=3, size=64):
    """n batches of 16 phantom slices with tumour, z-scored per slice and channel as in training."""
    import numpy as np

    from common.synthetic import phantom_volume

    rng, images, masks = np.random.default_rng(seed), [], []
    while len(images) < 16 * n:
        volume, mask = phantom_volume(rng, 10, size)
        keep = mask.any((1, 2))
        images += list(volume[keep])
        masks += list(mask[keep])
    x = torch.from_numpy(np.stack(images[: 16 * n])).permute(0, 3, 1, 2).float()
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-6)
    y = torch.from_numpy(np.stack(masks[: 16 * n]) > 0).float()[:, None]
    return list(zip(x.split(16), y.split(16)))


def trained_on_phantoms(model, steps=24, loss="bce+dice"):
    """(gap, found) after `steps` Adam steps at the preset's lr on phantom batches: the mean tumour
    logit minus the mean background logit, and the share of tumour pixels above logit 0 (training
    mode: each batch's own statistics, as the loss saw them)."""
    from common.loss import loss_from_terms, loss_terms

    batches = phantom_batches(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        loss_from_terms(loss_terms(model(x), y), loss).backward()
        optimizer.step()
    with torch.no_grad():
        x, y = batches[0]
        out = model(x)
    return float(out[y > 0].mean() - out[y == 0].mean()), float(((out > 0) & (y > 0)).sum() / (y > 0).sum())


SEEDS = range(4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_segnet_leaves_the_dice_0_plateau_in_its_first_steps_with_every_seed(seed):
    """SegNet's collapse (docs/studies/per-model): its output layer starts at the foreground's prior,
    and under the preset's bce+dice every seed finds the phantoms' tumour within 24 steps."""
    torch.manual_seed(seed)
    gap, found = trained_on_phantoms(SegNet(width=0.25))
    assert gap > 3 and found > 0.7, (gap, found)


@pytest.mark.slow
def test_segnet_started_at_p_one_half_stalls():
    """The cause, and what the test above guards: the same SegNet with its output started at p = 0.5
    (bias 0) leaves the tumour level with the background with seed 0 (3 seeds of 6 did so, as seed 0
    made the comparison's fold 2 collapse); U-Net and FCN-8s, started so, leave it (6 seeds of 6)."""
    torch.manual_seed(0)
    model = SegNet(width=0.25)
    torch.nn.init.zeros_(model.decoder[-1][-1].bias)
    assert trained_on_phantoms(model)[1] < 0.1
    for cls in (UNet, FCN8s):
        torch.manual_seed(0)
        assert trained_on_phantoms(cls(width=0.25))[0] > 2, cls
