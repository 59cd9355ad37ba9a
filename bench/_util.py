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


def in_rounds(sides: dict, rounds: int, log=print) -> dict[str, list]:
    """Run each side once per round, alternating (A, B, A, B, ...), so that a load spike on the
    machine falls on both sides rather than on one.

    Args:
        sides: name -> a function of the round index returning that run's result.
        rounds: how many times each side runs.

    Returns:
        name -> the results of its runs, in round order.
    """
    results: dict[str, list] = {name: [] for name in sides}
    for r in range(rounds):
        for name, run in sides.items():
            log(f"round {r + 1}/{rounds}: {name} ...", flush=True)
            results[name].append(run(r))
    return results


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict:
    """Per-round ratios (round ``r``'s numerator over round ``r``'s denominator), their median and
    spread (min, max)."""
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return {"median": round(median, 3), "min": round(ratios[0], 3), "max": round(ratios[-1], 3),
            "per_round": [round(n / d, 3) for n, d in zip(numerators, denominators)]}  # fmt: skip
