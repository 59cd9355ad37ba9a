"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist), resharded on load.

Layout of ``--save DIR``::

    DIR/iter_0000100/                  one torch_dist checkpoint (model, optimizer, scheduler, run state)
    DIR/latest_checkpointed_iteration.txt

The marker is replaced atomically, and only after every rank finished writing ``iter_XXXXXXX``; a
checkpoint interrupted half-way is never named by it, so it is never loaded. ``--load`` takes a
run directory (follows the marker) or one ``iter_*``/converted checkpoint directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

MARKER = "latest_checkpointed_iteration.txt"
# Fault injection for the tests: SIGKILL this process after writing a checkpoint, before its marker.
_KILL_BEFORE_MARKER_ENV = "SAMPO_TEST_KILL_BEFORE_MARKER"


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def resolve_checkpoint(path: str) -> str | None:
    """The checkpoint directory ``path`` designates: via its marker, or ``path`` itself.

    Returns ``None`` when ``path`` holds no completed checkpoint yet (a fresh ``--save`` directory).
    """
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            text = f.read().strip()
        try:
            iteration = int(text)
        except ValueError:
            raise ValueError(f"{marker}: expected an iteration number, found {text!r}") from None
        ckpt = iteration_dir(path, iteration)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"{marker} names iteration {iteration} but {ckpt} does not exist")
        return ckpt
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    return None


def _strategies(ckpt_dir: str | None, dp_group):
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )

    if ckpt_dir is None:
        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt_dir), dp_group)


# Reshardable optimizer state for the distributed optimizer (its default sharding type cannot be
# saved on 0.16.1, see shared/notes).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def model_sharded_state_dict(chunks, prefix: str = "") -> dict:
    """Sharded state of a model's chunks, keyed ``model`` (or ``model0``, ``model1``... per virtual stage)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(prefix=prefix)}
    return {f"model{i}": chunk.sharded_state_dict(prefix=prefix) for i, chunk in enumerate(chunks)}


def load_model_state(chunks, state: dict) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


@dataclass
class CheckpointContents:
    """What a trainer checkpoint holds beyond the model."""

    optimizer: object | None = None
    scheduler: object | None = None
    run_state: dict | None = None
    """Plain data: iteration, epoch, reference source, loss state, RNG."""
    reference_chunks: list | None = None
    """The reference replica, when it cannot be rebuilt from its source."""


def _sharded_state(chunks, contents: CheckpointContents, loading: bool) -> dict:
    state = model_sharded_state_dict(chunks)
    if contents.reference_chunks is not None:
        state["reference"] = model_sharded_state_dict(contents.reference_chunks, prefix="reference.")
    if contents.optimizer is not None:
        state["optimizer"] = contents.optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=OPTIMIZER_METADATA
        )
    if contents.scheduler is not None and not loading:
        state["scheduler"] = contents.scheduler.state_dict()
    if contents.run_state is not None and not loading:
        state["run_state"] = contents.run_state
    return state


def save_checkpoint(save_dir: str, iteration: int, chunks, contents: CheckpointContents, dp_group=None) -> str:
    """Write ``iter_XXXXXXX`` on all ranks, then (rank 0) point the marker at it.

    Returns:
        The checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    ckpt = iteration_dir(save_dir, iteration)
    if dist.get_rank() == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(chunks, contents, loading=False), ckpt, _strategies(None, dp_group))
    _stop_writer_manager()
    dist.barrier()
    if os.environ.get(_KILL_BEFORE_MARKER_ENV) == str(iteration):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if dist.get_rank() == 0:
        tmp = os.path.join(save_dir, MARKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, MARKER))
    dist.barrier()
    return ckpt


def _stop_writer_manager() -> None:
    """Shut down the multiprocessing Manager that megatron-core's checkpoint writer starts
    (``filesystem_async.py:55``) and keeps for the process's lifetime.

    A process killed by SIGKILL never runs the finalizer that stops it, so the Manager would outlive
    the run (under torchrun; a SLURM step kills it with the job). Stopping it after each save leaves
    it alive only while a checkpoint is being written, at the cost of a restart per save.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    if queue is not None:
        manager = getattr(queue, "_manager", None)
        if manager is not None:
            manager.shutdown()
        filesystem_async._results_queue = None


def has_key(ckpt_dir: str, key: str) -> bool:
    """Whether the checkpoint holds ``key`` in its common (non-tensor) state or as a tensor prefix."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    if key in common:
        return True
    tensors = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return any(name.startswith(key + ".") for name in tensors)


def load_checkpoint(ckpt_dir: str, chunks, contents: CheckpointContents, dp_group=None) -> dict:
    """Load into ``chunks`` (and optimizer / reference when given) from any TP/PP layout.

    Returns:
        The checkpoint's common state (``run_state``, ``scheduler``), empty for a model-only one.
    """
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state(chunks, contents, loading=True), ckpt_dir, _strategies(ckpt_dir, dp_group))
    load_model_state(chunks, state)
    if contents.reference_chunks is not None:
        load_model_state(contents.reference_chunks, state["reference"])
    if contents.optimizer is not None:
        contents.optimizer.load_state_dict(state["optimizer"])
        _untie_adam_steps(contents.optimizer)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    return {k: common[k] for k in ("run_state", "scheduler") if k in common}


def _untie_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    After a distributed-optimizer load, megatron-core 0.16.1 (distrib_optimizer.py:821-825) gives
    all parameters one shared ``step`` tensor, which Adam then advances once per parameter: the next
    update is silently wrong. Copies make each advance once per step again.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None:
            continue
        for param_state in torch_opt.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()
