"""Shared helpers for the benchmarks: peak-RSS windows and repeated timing."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager

import torch


class Activation(torch.autograd.Function):
    """Makes the logits a non-leaf graph node whose gradient is consumed and freed, as the output
    layer's activations are in training (so in-place backward and gradient lifetime are realistic)."""

    @staticmethod
    def forward(ctx, anchor, logits):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(1), None


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextmanager
def peak_rss_window():
    """Measure the peak resident memory (bytes) reached inside the block, above the RSS at its start.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` <- 5) so earlier peaks do not count.
    Yields a dict filled with ``extra_bytes`` when the block exits.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_kib("VmRSS")
    result: dict = {}
    yield result
    result["extra_bytes"] = (status_kib("VmHWM") - start) * 1024


def best_time(fn, repeats: int, setup=None) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (the least disturbed by other load);
    ``setup()`` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def print_result(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True))
