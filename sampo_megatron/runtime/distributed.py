"""Process groups and megatron-core's model-parallel state: the one set-up every process shares
(the trainer, generation, ``bench/gpu_check.py``).

Order: the launcher's variables (:mod:`.launch_env`: torchrun, srun, mpirun or a plain start), the
process group (NCCL on GPU, gloo on CPU), the megatron-core version check and CPU layer
(``sampo_megatron/compat``), the tensor/pipeline/context-parallel groups, then the seeds of torch
and of megatron's tensor-parallel RNG tracker (GPTModel's forward forks it even with dropout 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from .launch_env import apply_launch_env


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the layout, as the training loop and the reference need it."""

    dp_rank: int
    dp_size: int
    cp_size: int
    is_last_stage: bool
    """The last pipeline stage: the loss (and reference log-probs) live here."""
    writes_results: bool
    """Last stage, TP rank 0, CP rank 0: one writer per data-parallel replica (metrics, caches)."""
    logs: bool
    """The one rank that prints metrics and writes the metrics file."""
    tp_group: object
    cp_group: object
    """The context-parallel group, or None without context parallelism."""
    dp_group: object
    dp_cp_group: object
    """Data x context parallel: the group checkpoints are written over."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# Whether init_distributed created the default process group: close_distributed destroys it only
# then, so that a process that owns the group (a test pool, a notebook, a sweep) can build and close
# trainers one after another on it.
_created_default_group = False
# The process groups that existed before init_model_parallel: close_distributed destroys every
# other one (megatron-core's destroy_model_parallel forgets its groups without destroying them, and
# each new run would otherwise leave a set of gloo groups, their sockets and threads, behind).
_groups_before: set | None = None


def init_distributed() -> bool:
    """The default process group from the launcher's variables (a no-op when it exists).

    Returns:
        True when this call created the group (then :func:`close_distributed` destroys it).
    """
    global _created_default_group
    if dist.is_initialized():
        return False
    apply_launch_env()  # srun / mpirun / a plain python start: RANK, WORLD_SIZE, MASTER_ADDR, ...
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _created_default_group = True
    return True


def init_model_parallel(parallel: ParallelConfig, seed: int, virtual_pipeline_size: int | None = None) -> ParallelInfo:
    """megatron-core's parallel state for ``parallel`` on the initialised process group, seeded.

    Args:
        parallel: the layout flags.
        seed: torch's and the tensor-parallel RNG tracker's seed.
        virtual_pipeline_size: virtual stages per pipeline rank (interleaving), or None.
    """
    from ..compat import apply_cpu_compat
    from ..compat.notices import quiet_expected_notices

    quiet_expected_notices()  # log notices nobody can act on (compat/notices.py)
    apply_cpu_compat()  # the megatron-core version check, and the CPU layer where there is no GPU
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    global _groups_before
    if ps.model_parallel_is_initialized():
        raise RuntimeError("megatron-core's model-parallel state is already initialised: close the previous run first "
                           "(close_distributed)")  # fmt: skip
    _groups_before = set(_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    cp_size = ps.get_context_parallel_world_size()
    writes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    return ParallelInfo(
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_size=cp_size,
        is_last_stage=ps.is_pipeline_last_stage(),
        writes_results=writes,
        logs=writes and ps.get_data_parallel_rank() == 0,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group() if cp_size > 1 else None,
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )


def _process_groups() -> list:
    """Every process group torch.distributed knows in this process, the default one included."""
    return list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []


def reset_megatron_state() -> None:
    """Forget megatron-core's process-wide state of a run: the model-parallel groups (destroyed,
    not just forgotten), the global memory buffer, the tensor-parallel RNG tracker and the
    micro-batch calculator. A no-op for what was never set up."""
    import sys

    global _groups_before
    if "megatron.core" not in sys.modules:
        return
    from megatron.core import num_microbatches_calculator, parallel_state
    from megatron.core.tensor_parallel import random

    created = set(_megatron_groups(parallel_state))
    if _groups_before is not None:  # also the ones it made and kept nowhere
        created.update(g for g in _process_groups() if g not in _groups_before)
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_global_memory_buffer()
    num_microbatches_calculator.destroy_num_microbatches_calculator()
    random.initialize_rng_tracker(force_reset=True)  # a fresh tracker with no states
    live = set(_process_groups())
    for group in created:
        if group is not dist.GroupMember.WORLD and group in live:
            dist.destroy_process_group(group)
    _groups_before = None


def _megatron_groups(parallel_state) -> list:
    """The process groups megatron-core's parallel state holds in its module globals (alone or in
    lists), whoever initialised it (init_model_parallel or a direct call)."""
    found = []
    for value in vars(parallel_state).values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, dist.ProcessGroup):
                found.append(item)
    return found


def close_distributed(barrier: bool = True) -> None:
    """End a run's distributed state: megatron-core's (:func:`reset_megatron_state`), and the
    default process group when :func:`init_distributed` created it (a group the caller created
    stays, for the next run). Left to interpreter exit, gloo's threads can still be joinable when
    their destructors run, and the process aborts ('terminate called without an active
    exception') after a successful run.

    Args:
        barrier: wait for every rank first (off after a failure: other ranks may be gone).
    """
    global _created_default_group
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    reset_megatron_state()
    if _created_default_group:
        dist.destroy_process_group()
        _created_default_group = False


def rank0_print(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)
