"""Jobs for tests/test_pool.py: small functions every rank of a pool runs (importable by name)."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def rank_and_sum(value: int) -> tuple[int, int]:
    """This rank and the all-reduced sum of ``value`` over the ranks."""
    total = torch.tensor([value])
    dist.all_reduce(total)
    return dist.get_rank(), int(total.item())


def fail_on(rank: int) -> str:
    print(f"rank {dist.get_rank()} was here", flush=True)
    if dist.get_rank() == rank:
        raise ValueError(f"planted failure on rank {rank}")
    return "fine"


def hang(seconds: float) -> None:
    print("about to hang", flush=True)
    time.sleep(seconds)


def kill_rank(rank: int) -> str:
    print(f"rank {dist.get_rank()} before the kill", flush=True)
    if dist.get_rank() == rank:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def leave_a_signal_handler() -> None:
    signal.signal(signal.SIGTERM, lambda *_: None)


def leave_model_parallel_state() -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())


def train_layouts(runs: list[list[str]]) -> list[int]:
    """``sampo-train`` (cli/train.py) once per argument list, one after the other in this process;
    the exit codes."""
    from sampo_megatron.cli.train import main

    codes = []
    for argv in runs:
        try:
            main(argv)
            codes.append(0)
        except SystemExit as exit_:
            codes.append(exit_.code or 0)
    return codes


def count_resolves(argv: list[str]) -> int:
    """``sampo-train argv`` in this process; how many times the run's plan was resolved."""
    from sampo_megatron import plan
    from sampo_megatron.cli.train import main

    calls = []
    original = plan.resolve

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    plan.resolve = counting
    try:
        main(argv)
    finally:
        plan.resolve = original
    return len(calls)
