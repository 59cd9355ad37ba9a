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


def init_distributed() -> None:
    """The default process group from the launcher's variables (a no-op when it exists)."""
    if dist.is_initialized():
        return
    apply_launch_env()  # srun / mpirun / a plain python start: RANK, WORLD_SIZE, MASTER_ADDR, ...
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


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


def close_distributed(barrier: bool = True) -> None:
    """Destroy megatron's groups and the process group. Left to interpreter exit, gloo's threads can
    still be joinable when their destructors run, and the process aborts ('terminate called
    without an active exception') after a successful run.

    Args:
        barrier: wait for every rank first (off after a failure: other ranks may be gone).
    """
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    if barrier:
        dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def rank0_print(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)
