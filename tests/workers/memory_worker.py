"""Peak memory of short trainer runs, measured, next to the planner's prediction.

Usage: torchrun ... memory_worker.py --out RESULT.json --layouts JSON <pretrain_sampo flags>

``--layouts`` maps a name to extra flags; each layout builds a Trainer and trains in this process,
one after the other (the process group is kept, megatron's model-parallel state is rebuilt).

How it measures: torch's profiler with ``profile_memory=True`` records every allocation and free
of torch's CPU allocator with its size and time. The profile starts right before the Trainer is
built (after the process group exists) and ends after the last step; the peak is the maximum of
the running sum of those sizes, i.e. the most bytes of tensors that were alive at once during
model building and training, on top of whatever was alive before. That is what a GPU's
``max_memory_allocated`` reports, without the RSS noise of the Python heap and glibc.
"""

import gc
import json
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from sampo_megatron.config import parse_config
from sampo_megatron.plan import resolve
from sampo_megatron.planning.dry_run import model_shape
from sampo_megatron.planning.memory import plan_memory
from sampo_megatron.runtime.distributed import close_distributed, reset_megatron_state
from sampo_megatron.training.trainer import Trainer


def peak_allocated(prof) -> int:
    """The peak of the running sum of allocation sizes (frees are negative) in time order."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.nbytes() != 0 and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def configs_of(chunks) -> list[dict]:
    keys = ("recompute_granularity", "recompute_method", "recompute_num_layers", "fp8", "fp8_recipe", "first_last_layers_bf16")
    return [{k: getattr(chunk.config, k) for k in keys} for chunk in chunks]


def main() -> None:
    argv = sys.argv[1:]
    out = argv[argv.index("--out") + 1]
    layouts = json.loads(argv[argv.index("--layouts") + 1])
    base = [
        a for i, a in enumerate(argv) if a not in ("--out", "--layouts") and (i == 0 or argv[i - 1] not in ("--out", "--layouts"))
    ]
    results = {}
    for name, flags in layouts.items():
        cfg = parse_config(base + flags)
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_plan = resolve(cfg)
            trainer = Trainer(run_plan)
            trainer.train()
        world = dist.get_world_size()
        assert run_plan.world_size == world
        plan = plan_memory(model_shape(run_plan.config, run_plan.vocab_size), run_plan.layout)
        results[name] = {
            "measured": peak_allocated(prof),
            "predicted": plan.total,
            "parts": plan.parts,
            "params": sum(p.numel() for chunk in trainer.chunks for p in chunk.parameters()),
            "policy_configs": configs_of(trainer.chunks),
            "reference_configs": configs_of(trainer.reference.chunks or []),
        }
        trainer.logger.close()
        reset_megatron_state()
        del trainer, prof
        gc.collect()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    close_distributed()


if __name__ == "__main__":
    main()
