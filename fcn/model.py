"""FCN-8s (Long et al. 2015) on a VGG16-BN encoder, in the compact form the original study used
(~20 M parameters at width 1.0): no fc6/fc7, transposed-conv upsampling with skips from pool4 and
pool3. Every layer is used in forward, so DDP needs no `find_unused_parameters`."""

import torch.nn as nn

from common.blocks import scaled, vgg16_bn_stages


class FCN8s(nn.Module):
    def __init__(self, in_channels=3, out_channels=1, width=1.0, weights_path=None):
        super().__init__()
        self.stages = vgg16_bn_stages(width, weights_path, in_channels)
        self.pool = nn.MaxPool2d(2)
        c3, c4, mid = scaled(256, width), scaled(512, width), scaled(256, width)
        self.up5 = nn.ConvTranspose2d(c4, c4, 4, stride=2, padding=1)  # /32 -> /16
        self.reduce4 = nn.Conv2d(c4, mid, 1)
        self.up4 = nn.ConvTranspose2d(mid, c3, 4, stride=2, padding=1)  # /16 -> /8
        self.score = nn.Conv2d(c3, out_channels, 1)
        self.up8 = nn.ConvTranspose2d(out_channels, out_channels, 16, stride=8, padding=4)  # /8 -> /1

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = self.pool(stage(x))
            feats.append(x)
        _, _, p3, p4, p5 = feats
        x = self.reduce4(self.up5(p5) + p4)
        x = self.up4(x) + p3
        return self.up8(self.score(x))
