"""What several processes need beyond Accelerate: one process deciding for all (main_value,
on_main_first), SIGTERM acted upon together (Preemption), and batch-norm statistics over all
processes on CPUs too (sync_batchnorm)."""

import signal
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate.utils import broadcast_object_list

from common.errors import UserError


class Preemption:
    """SIGTERM (what Slurm sends before pre-empting a job or at its time limit) and a first Ctrl-C:
    noted when they come, acted upon at the next check, which all processes make together. A second
    Ctrl-C stops at once."""

    CHECK_EVERY = 10  # steps: a check costs a collective, i.e. a host sync

    def __init__(self):
        self.asked, self.name = False, "SIGTERM"  # name: what asked (another process's signal: SIGTERM)
        signal.signal(signal.SIGTERM, self.note)
        signal.signal(signal.SIGINT, self.interrupt)

    def note(self, *_):
        self.asked = True

    def interrupt(self, *_):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not self.asked:
            print("Ctrl-C: saving at the next check (Ctrl-C again to stop at once)", file=sys.stderr)
        self.asked, self.name = True, "Ctrl-C"

    def now(self, accelerator):
        if accelerator.num_processes == 1:
            return self.asked
        return (
            accelerator.reduce(torch.tensor([float(self.asked)], device=accelerator.device), "max").item() > 0
        )


def on_main_first(accelerator, fn):
    """fn() on the main process, then on the others (which find its cache in place). A failure on the
    main process is raised on every process, rather than leaving them waiting at a barrier."""
    result, failure, error = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:
            failure, error = e, str(e) if isinstance(e, UserError) else f"main process failed: {e!r}"
    error = main_value(accelerator, error)
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result if accelerator.is_main_process else fn()


def main_value(accelerator, value):
    """The main process's value, on every process."""
    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


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
