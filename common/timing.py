"""Clocks that tell the truth on accelerators: kernels run asynchronously, so the device is
synchronised before every reading."""

import os
import platform
import statistics
import time
from pathlib import Path

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
        self.start = self.last = self.now()

    def now(self, sync=True):
        if sync:
            synchronize(self.device)
        return time.perf_counter()

    def elapsed(self):
        return self.now() - self.start

    def lap(self, sync=True):
        """Seconds since the previous lap (or the start)."""
        now = self.now(sync)
        lap, self.last = now - self.last, now
        return lap


class StepTimes:
    """Per-step data wait (until the batch is on the device), compute (inputs, forward, backward,
    optimiser) and rest, of one epoch. Synchronised steps (always on a CPU, with --step-timing on an
    accelerator) split the time truly; unsynchronised ones only tell where the host waited, which is
    wherever the device's full queue stopped it, so the loop reports no split for them."""

    def __init__(self, clock, sync):
        self.clock, self.sync = clock, sync
        self.data, self.compute, self.rest = [], [], []

    def waited(self):
        self.data.append(self.clock.lap(self.sync))

    def computed(self):
        self.compute.append(self.clock.lap(self.sync))

    def done(self):
        self.rest.append(self.clock.lap(self.sync))

    def summary(self, warmup=5):
        """Sums over the epoch and medians over the steps after a warm-up."""
        skip = min(warmup, len(self.data) // 5)

        def med(v):
            return statistics.median(v[skip:]) if v[skip:] else 0.0

        total = [a + b + c for a, b, c in zip(self.data, self.compute, self.rest)]
        return {
            "data_wait_s": sum(self.data),
            "compute_s": sum(self.compute),
            "rest_s": sum(self.rest),
            "step_median_s": med(total),
            "step_data_median_s": med(self.data),
            "step_compute_median_s": med(self.compute),
            "steps": len(self.data),
            "step_timing_synced": self.sync,
        }


def device_name(device):
    """The card's name, or for a CPU its model and core count ("cpu (AMD EPYC, 2 cores)"): a timing
    without the machine it was measured on cannot be compared."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    model = platform.processor()
    try:  # Linux puts the marketing name here; platform.processor() says only "x86_64" there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model or 'unknown model'}, {os.cpu_count()} cores)"


def peak_memory(device):
    """Peak memory of this process: allocated tensors on a GPU (since the last reset), resident set
    size on the host (since the start)."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_of": "cuda tensors",
        }
    import resource

    return {
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_of": "host RSS",
    }


def gflops(build_model, args):
    """Forward GFLOPs per image at args.image_size (2 FLOPs per multiply-add), counted by torch on
    a copy of the model built on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(args)
        first = next(
            m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
        )  # 3 or, with --context, more
        x = torch.empty(1, first.in_channels, args.image_size, args.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def default_threads(local_processes):
    """CPU threads per process that do not oversubscribe: the cores this process may use, shared
    among the processes of this machine."""
    import os

    return max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))
