"""SegNet (Badrinarayanan et al. 2017): VGG16-BN encoder (13 conv-BN-ReLU), mirrored decoder that
upsamples with max-unpooling at the encoder's pooling indices (13 convs, the last one giving the
class logits). Built for the task's own output (the original had 19 classes by mistake)."""

import math

import torch.nn as nn

from common.blocks import conv_bn_relu, scaled, vgg16_bn_stages

# Share of tumour pixels the output starts at (RetinaNet's prior initialisation). Started at
# p = 0.5, SegNet's first steps go into lowering every logit at once (~99 % of pixels are
# background), and some seeds never leave that state: a decoder without skip connections that ignores
# its input (docs/studies/per-model; U-Net and FCN-8s leave it with every seed).
PRIOR = 0.01


class SegNet(nn.Module):
    def __init__(self, in_channels=3, out_channels=1, width=1.0):
        super().__init__()
        self.encoder = vgg16_bn_stages(width, in_channels=in_channels)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        # decoder stage i mirrors encoder stage 4-i: same number of convs, ending on the channels
        # of the encoder stage before it
        ch = [scaled(c, width) for c in (64, 128, 256, 512, 512)]
        sizes = [len([m for m in s if isinstance(m, nn.Conv2d)]) for s in self.encoder]
        self.decoder = nn.ModuleList()
        for i in reversed(range(5)):
            cout = ch[i - 1] if i > 0 else ch[0]
            layers = [conv_bn_relu(ch[i], ch[i]) for _ in range(sizes[i] - 1)]
            layers.append(
                conv_bn_relu(ch[i], cout) if i > 0 else nn.Conv2d(ch[0], out_channels, 3, padding=1)
            )
            self.decoder.append(nn.Sequential(*layers))
        nn.init.constant_(self.decoder[-1][-1].bias, math.log(PRIOR / (1 - PRIOR)))

    def forward(self, x):
        indices, shapes = [], []
        for stage in self.encoder:
            x = stage(x)
            shapes.append(x.shape)
            x, idx = self.pool(x)
            indices.append(idx)
        for stage, idx, shape in zip(self.decoder, reversed(indices), reversed(shapes)):
            x = stage(self.unpool(x, idx, output_size=shape))
        return x
