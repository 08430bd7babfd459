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
