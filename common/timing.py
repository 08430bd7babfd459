"""Clocks that tell the truth on accelerators: kernels run asynchronously, so the device is
synchronised before every reading."""
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


class Stopwatch:
    def __init__(self, device):
        self.device = device
        self.start = self.now()

    def now(self):
        synchronize(self.device)
        return time.perf_counter()

    def elapsed(self):
        return self.now() - self.start


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_memory(device):
    """Peak memory of this process: allocated tensors on a GPU, resident set size on the host."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_of": "cuda tensors"}
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_of": "host RSS"}


def gflops(build_model, args):
    """Forward GFLOPs per image at args.image_size (2 FLOPs per multiply-add), counted by torch on
    a copy of the model built on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model, x = build_model(args), torch.empty(1, 3, args.image_size, args.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9
