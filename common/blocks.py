"""Layers shared by the models: conv-BN-ReLU and the VGG16-BN encoder stages (FCN and SegNet)."""

import torch
import torch.distributed as dist
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


class AllReduceSum(torch.autograd.Function):
    """Sum over all processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm with statistics over all processes, for CPU (gloo) runs: torch's SyncBatchNorm
    accepts GPU modules only. Mean, then variance (two passes: E[x^2] - E[x]^2 loses digits in
    float32) are summed over processes with autograd, so the gradient is that of one process
    holding the whole global batch."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c, shape = x.shape[1], (1, x.shape[1], 1, 1)
        local = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        sums = AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), local]))
        n = sums[-1]
        mean = sums[:c] / n
        var = AllReduceSum.apply(((x - mean.view(shape)) ** 2).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def sync_batchnorm(model, device):
    """Every BatchNorm2d of `model` with statistics over all processes: torch's SyncBatchNorm on
    GPUs, CPUSyncBatchNorm elsewhere."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            sync = CPUSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            sync_batchnorm(child, device)
    return model
