"""Layers shared by the models: conv-BN-ReLU and the VGG16-BN encoder stages (FCN and SegNet)."""

import torch
import torch.nn as nn


def scaled(channels, width):
    """Channel count at a width multiplier (width 1.0 = the published model), never below 4."""
    return max(4, int(round(channels * width)))


def conv_bn_relu(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def vgg16_bn_stages(width=1.0, weights_path=None, in_channels=3):
    """The 13 conv-BN-ReLU layers of torchvision's VGG16-BN, cut into its 5 pooling stages
    (the pools themselves are left to the caller: FCN pools plainly, SegNet keeps the indices).

    weights_path: a local torchvision `vgg16_bn` state dict (ImageNet weights), width 1.0 only;
    nothing is ever downloaded. in_channels other than 3 (--context) replace the first convolution.
    """
    # imported here: torchvision takes seconds to import, and U-Net needs none of it
    from torchvision.models import vgg

    cfg = [v if v == "M" else scaled(v, width) for v in vgg.cfgs["D"]]
    features = vgg.make_layers(cfg, batch_norm=True)
    if weights_path is not None:
        if width != 1.0:
            raise ValueError("pretrained VGG16-BN weights need --width 1.0")
        full = vgg.vgg16_bn(weights=None)
        full.load_state_dict(vgg_state_dict(weights_path))
        features = full.features
    if in_channels != 3:
        if weights_path is not None:
            raise ValueError("pretrained VGG16-BN weights take 3 input channels: --context needs them off")
        features[0] = nn.Conv2d(in_channels, features[0].out_channels, 3, padding=1)
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
