"""Layers shared by the models: conv-BN-ReLU and the VGG16-BN encoder stages (FCN and SegNet)."""

import torch
import torch.nn as nn
from torchvision.models import vgg


def scaled(channels, width):
    """Channel count at a width multiplier (width 1.0 = the published model), never below 4."""
    return max(4, int(round(channels * width)))


def conv_bn_relu(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def vgg16_bn_stages(width=1.0, weights_path=None):
    """The 13 conv-BN-ReLU layers of torchvision's VGG16-BN, cut into its 5 pooling stages
    (the pools themselves are left to the caller: FCN pools plainly, SegNet keeps the indices).

    weights_path: a local torchvision `vgg16_bn` state dict (ImageNet weights), width 1.0 only;
    nothing is ever downloaded.
    """
    cfg = [v if v == "M" else scaled(v, width) for v in vgg.cfgs["D"]]
    features = vgg.make_layers(cfg, batch_norm=True)
    if weights_path is not None:
        if width != 1.0:
            raise ValueError("pretrained VGG16-BN weights need --width 1.0")
        full = vgg.vgg16_bn(weights=None)
        full.load_state_dict(vgg_state_dict(weights_path))
        features = full.features
    stages, layers = [], []
    for m in features:
        if isinstance(m, nn.MaxPool2d):
            stages.append(nn.Sequential(*layers))
            layers = []
        else:
            layers.append(m)
    return nn.ModuleList(stages)


def vgg_state_dict(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)
