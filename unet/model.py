"""U-Net (Ronneberger et al. 2015) as the original study built it: 5 levels of two conv-BN-ReLU,
64..1024 channels at width 1.0 (34.5 M parameters), nearest-neighbour upsampling in the decoder."""

import torch
import torch.nn as nn

from common.blocks import conv_bn_relu, scaled


def double_conv(cin, cout):
    return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))


class Up(nn.Module):
    """2x nearest upsample, conv halving the channels, concat with the skip, two convs."""

    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_bn_relu(cin, cout))
        self.conv = double_conv(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels=3, out_channels=1, width=1.0):
        super().__init__()
        ch = [scaled(c, width) for c in (64, 128, 256, 512, 1024)]
        self.down = nn.ModuleList(
            [double_conv(in_channels, ch[0])] + [double_conv(a, b) for a, b in zip(ch, ch[1:])]
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([Up(a, b) for a, b in zip(ch[:0:-1], ch[-2::-1])])
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x)
