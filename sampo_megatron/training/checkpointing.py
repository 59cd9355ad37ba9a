"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist), resharded on load.

Layout of ``--save DIR``::

    DIR/iter_0000100/                  one torch_dist checkpoint (model, optimizer, scheduler, run state)
    DIR/latest_checkpointed_iteration.txt

The marker is replaced atomically, and only after every rank finished writing ``iter_XXXXXXX``; a
checkpoint interrupted half-way is never named by it, so it is never loaded. ``--load`` takes a
run directory (follows the marker) or one ``iter_*``/converted checkpoint directory.
"""

from __future__ import annotations

import contextlib
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
        _allocate_torch_adam_state(contents.optimizer)
        state["optimizer"] = contents.optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=OPTIMIZER_METADATA
        )
    if contents.scheduler is not None and not loading:
        state["scheduler"] = contents.scheduler.state_dict()
    if contents.run_state is not None and not loading:
        state["run_state"] = contents.run_state
    return state


def save_checkpoint(
    save_dir: str, iteration: int, chunks, contents: CheckpointContents, dp_group=None, finish=None
) -> str:
    """Write ``iter_XXXXXXX`` on all ranks, then (rank 0) point the marker at it.

    Args:
        finish: called on rank 0 with the checkpoint directory once its tensors are written and
            before the marker moves, for files that belong to the checkpoint.

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
    if finish is not None and dist.get_rank() == 0:
        finish(ckpt)  # extra files (the architecture) belong to the checkpoint, so before the marker
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


def check_optimizer_state(ckpt_dir: str, distributed: bool, mixed_precision: bool) -> None:
    """Refuse, with a clear error, optimizer state that this run's optimizer cannot read.

    The distributed optimizer keeps fp32 main weights as ``optimizer.state.param.*``; the regular
    16-bit optimizer as ``optimizer.state.fp32_param.*``; the regular fp32 one keeps none (its
    weights are the model's). A distributed-optimizer checkpoint resumes with the regular fp32
    optimizer (see :func:`_complete_param_groups`); the other crossings would fail deep inside
    megatron-core with a ``KeyError``.
    """
    from megatron.core import dist_checkpointing

    names = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    if not any(name.startswith("optimizer.") for name in names):
        return  # no optimizer state (a converted checkpoint)
    saved_distributed = any(name.startswith("optimizer.state.param.") for name in names)
    hint = "resume with the setting it was saved with, or start from its weights only with --finetune"
    if distributed and not saved_distributed:
        raise ValueError(f"{ckpt_dir}: its optimizer state was saved without --use-distributed-optimizer; {hint}")
    if saved_distributed and not distributed and mixed_precision:
        raise ValueError(
            f"{ckpt_dir}: its optimizer state was saved with --use-distributed-optimizer, which a --bf16/--fp16 run "
            f"reads only with --use-distributed-optimizer; {hint}"
        )


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
        _complete_param_groups(contents.optimizer, state["optimizer"])
        _restore_zero_adam_step(contents.optimizer, state["optimizer"])
        with _adam_steps_set_aside(contents.optimizer):
            contents.optimizer.load_state_dict(state["optimizer"])
        _untie_adam_steps(contents.optimizer)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    return {k: common[k] for k in ("run_state", "scheduler") if k in common}


def _complete_param_groups(optimizer, loaded: dict) -> None:
    """Read a distributed-optimizer checkpoint into a regular optimizer (e.g. resuming on fewer GPUs
    without ``--use-distributed-optimizer``).

    The loaded param groups then hold only ``params``: the checkpoint keeps the groups, with Adam's
    ``step``, under ``optimizer.param_groups``, and the moments without a ``step``. megatron-core
    (0.16.1) would fail with ``KeyError: 'pre_wd_mult'`` matching the groups, then torch's Adam with
    ``KeyError: 'step'``. The groups get the checkpoint's hyper-parameters (the running optimizer's
    when absent: same grouping of the same model, in the same order) and the moments the
    checkpoint's step as the ``common_step`` the regular optimizer restores per parameter.
    """
    groups = loaded.get("param_groups") if isinstance(loaded, dict) else None
    if not groups or all(len(group) > 1 for group in groups):
        return  # a regular checkpoint: complete groups
    saved = (loaded.get("optimizer") or {}).get("param_groups") or []
    running = getattr(optimizer, "param_groups", None) or []
    for i, group in enumerate(groups):
        for source in (saved[i] if i < len(saved) else {}, running[i] if i < len(running) else {}):
            for key, value in source.items():
                group.setdefault(key, value)
    steps = {group.pop("step") for group in groups if "step" in group}
    torch_state = loaded.get("state")
    if len(steps) == 1 and torch_state and not any("step" in s for s in torch_state.values() if isinstance(s, dict)):
        torch_state.setdefault("common_step", torch.tensor(float(steps.pop())))


def _torch_adams(optimizer, distributed_only: bool = False) -> list:
    """The megatron optimizers in ``optimizer`` that run torch's Adam (no Apex / TE fused Adam).

    torch's Adam keeps a per-parameter ``step`` tensor in its state and allocates its state lazily;
    megatron-core (0.16.1) mishandles both in the places the helpers below fix. With TE's or Apex's
    Adam (the usual GPU set-up) there is no such ``step`` and none of them acts.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [
        inner
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(getattr(inner, "optimizer", None), torch.optim.Adam)
        and (isinstance(inner, DistributedOptimizer) or not distributed_only)
    ]


def _allocate_torch_adam_state(optimizer) -> None:
    """Allocate torch Adam's state where it is still empty, as its first step would: zero moments,
    ``step`` 0. A no-op once the optimizer has stepped.

    Empty state happens in a freshly built optimizer that is about to load, and at a save before
    any successful step (fp16 skips its first steps while the loss scale backs off from 2**32).
    Without it the distributed optimizer's ``state_dict()`` asserts (distrib_optimizer.py:642), and
    the other optimizers save no moments but expect them at load (a ``KeyError`` on
    ``optimizer.state.exp_avg...``).
    """
    for inner in _torch_adams(optimizer):
        adam = inner.optimizer
        if len(adam.state) == 0:
            inner.init_state_fn(adam, inner.config)  # exp_avg, exp_avg_sq
            for group in adam.param_groups:
                for param in group["params"]:
                    adam.state[param]["step"] = torch.tensor(0.0)


def _restore_zero_adam_step(optimizer, loaded: dict) -> None:
    """Put back a zero Adam ``step`` that the non-distributed optimizers did not save.

    They save the step shared by all parameters as ``common_step`` only when it is non-zero
    (optimizer.py:845), and torch's Adam refuses moments without a step (adam.py:127,
    ``KeyError: 'step'``): a checkpoint written before the first successful step (fp16 skips its
    first steps while the loss scale backs off) would not load.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(inners) == 1 else [loaded[k] for k in sorted(loaded)]
    adams = _torch_adams(optimizer)
    for inner, state in zip(inners, states):
        torch_state = state.get("optimizer", {}).get("state") if inner in adams and isinstance(state, dict) else None
        if torch_state and "common_step" not in torch_state and not any("step" in s for s in torch_state.values()):
            torch_state["common_step"] = torch.tensor(0.0)


@contextlib.contextmanager
def _adam_steps_set_aside(optimizer):
    """Keep torch Adam's ``step`` out of the parameter-state load.

    ``load_state_dict`` first restores ``step`` from the param groups, then loads the per-parameter
    tensors by copying every key of a parameter's Adam state from the checkpoint
    (distrib_optimizer.py:940), where ``step`` is absent: ``KeyError: 'step'``. The steps are
    removed for that part of the load and put back unchanged afterwards.
    """
    patched = []
    for inner in _torch_adams(optimizer, distributed_only=True):
        name = "load_parameter_state_from_" + OPTIMIZER_METADATA["distrib_optim_sharding_type"]
        original = getattr(inner, name)

        def load_without_steps(state_dict, *, _adam=inner.optimizer, _original=original):
            steps = {param: s.pop("step") for param, s in _adam.state.items() if "step" in s}
            try:
                return _original(state_dict)
            finally:
                for param, step in steps.items():
                    _adam.state[param]["step"] = step

        setattr(inner, name, load_without_steps)  # an instance attribute, removed below
        patched.append((inner, name))
    try:
        yield
    finally:
        for inner, name in patched:
            delattr(inner, name)


def _untie_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    After a distributed-optimizer load, megatron-core 0.16.1 (distrib_optimizer.py:821-825) gives
    all parameters one shared ``step`` tensor, which Adam then advances once per parameter: the next
    update is silently wrong. Copies make each advance once per step again.
    """
    for inner in _torch_adams(optimizer):
        for param_state in inner.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()
