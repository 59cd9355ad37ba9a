"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist), resharded on load.

Layout of ``--save DIR``::

    DIR/iter_0000100/                  one torch_dist checkpoint (model, optimizer, scheduler, run state)
    DIR/latest_checkpointed_iteration.txt

The marker is replaced atomically, and only after every rank finished writing ``iter_XXXXXXX`` and
its ``manifest.json`` (size and SHA-256 of every file, sampo_megatron/checkpoint/manifest.py); a
checkpoint interrupted half-way is never named by it, so it is never loaded. ``--load`` takes a
run directory (follows the marker) or one ``iter_*``/converted checkpoint directory.

Before a load, :func:`select_checkpoint` checks the checkpoint's pickles with an allow-list
(checkpoint/safe_pickle.py) and verifies its manifest on all ranks (each rank checks a share of
the files); when the latest checkpoint of a run directory is damaged it falls back to the newest
older one that verifies, loudly.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import torch.distributed as dist

from ..checkpoint import (
    CheckpointDamagedError,
    UnsafeCheckpointError,
    check_torch_dist_pickles,
    digest_files,
    list_files,
    read_manifest,
    verify_files,
    write_manifest,
)  # fmt: skip
from ..checkpoint.layout import MARKER, iteration_dir, marked_iteration
from ..compat.checkpoint_writer import start_writer_manager, stop_writer_manager
from ..compat.optimizer_state import DISTRIB_OPTIM_SHARDING_TYPE, load_optimizer_state, prepare_optimizer_state

# Fault injection for the tests: SIGKILL this process after writing a checkpoint, before its marker.
_KILL_BEFORE_MARKER_ENV = "SAMPO_TEST_KILL_BEFORE_MARKER"


def resolve_checkpoint(path: str) -> str | None:
    """The checkpoint directory ``path`` designates: via its marker, or ``path`` itself.

    Returns ``None`` when ``path`` holds no completed checkpoint yet (a fresh ``--save`` directory).
    """
    iteration = marked_iteration(path)
    if iteration is not None:
        ckpt = iteration_dir(path, iteration)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"{os.path.join(path, MARKER)} names iteration {iteration} but {ckpt} does not exist")
        return ckpt
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    return None


def _marker_target(save_dir: str) -> str | None:
    try:
        return resolve_checkpoint(save_dir) if os.path.isfile(os.path.join(save_dir, MARKER)) else None
    except (ValueError, FileNotFoundError):
        return None


def _write_marker(save_dir: str, iteration: int) -> None:
    tmp = os.path.join(save_dir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, MARKER))


def _shares(names: list[str]) -> list[str]:
    """This rank's share of ``names`` when every rank takes every world-size-th one."""
    if not dist.is_initialized():
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _write_manifest(ckpt: str) -> None:
    """Every rank hashes its share of the checkpoint's files; rank 0 writes the manifest."""
    names = list_files(ckpt) if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized():
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    digests = {}
    for part in _gather(digest_files(ckpt, _shares(names))):
        digests.update(part)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_manifest(ckpt, digests)
    if dist.is_initialized():
        dist.barrier()


def verify_checkpoint(ckpt: str, trust: bool = False) -> list[str]:
    """Problems of ``ckpt`` (collective: every rank checks a share of the files): files that do not
    match its manifest or that it does not list, or pickles outside the allow-list (unless
    ``trust``). Empty when it is sound.

    A checkpoint without a manifest (converted, or saved by an older version) is reported as
    unverified by the caller, not as damaged.
    """
    problems: list[str] = []
    try:
        manifest = read_manifest(ckpt)
        if manifest is not None:
            problems += verify_files(ckpt, manifest, _shares(sorted(manifest)))
            if not dist.is_initialized() or dist.get_rank() == 0:
                # A file the save did not write can change what loads (megatron-core 0.19 writes no
                # common.pt, but reads one if it is there).
                problems += [f"{os.path.join(ckpt, name)}: not part of the checkpoint (absent from its manifest)"
                             for name in list_files(ckpt) if name not in manifest]  # fmt: skip
    except CheckpointDamagedError as err:
        problems.append(str(err))
    problems = sorted({p for part in _gather(problems) for p in part})
    if not problems and not trust:
        try:
            check_torch_dist_pickles(ckpt)
        except UnsafeCheckpointError as err:
            problems.append(str(err))
    return problems


class CheckpointLoadError(RuntimeError):
    """No sound checkpoint to load (damaged, unsafe, and no fallback allowed or found)."""


def _older_checkpoints(save_dir: str, than: str) -> list[str]:
    """Complete checkpoints of a run directory older than ``than``, newest first."""
    found = []
    for name in os.listdir(save_dir):
        if name.startswith("iter_") and name[5:].isdigit() and os.path.join(save_dir, name) < than:
            path = os.path.join(save_dir, name)
            if os.path.isfile(os.path.join(path, "metadata.json")):
                found.append(path)
    return sorted(found, reverse=True)


def select_checkpoint(path: str, verify: bool = True, fallback: bool = True, trust: bool = False, log=print) -> str | None:
    """The checkpoint to load from ``path`` (a run directory or one checkpoint), verified.

    Collective: every rank calls it and gets the same answer. When the checkpoint is damaged and
    ``path`` is a run directory, falls back to the newest older checkpoint that verifies (unless
    ``fallback`` is False): the damaged one is moved aside to ``iter_XXXXXXX.damaged`` and the marker
    is pointed at the one loaded, so that the run's next save of that iteration starts clean.

    Returns:
        The checkpoint directory, or None when ``path`` holds none yet.

    Raises:
        CheckpointLoadError: damaged or unsafe, with no fallback; the message names each problem.
    """
    ckpt = resolve_checkpoint(path)
    if ckpt is None or not verify:
        return ckpt
    problems = verify_checkpoint(ckpt, trust)
    if not problems:
        if read_manifest(ckpt) is None:
            log(f"checkpoint {ckpt} has no manifest.json (converted or saved by an older version): not verified")
        return ckpt
    details = "\n  ".join(problems)
    is_run_dir = os.path.abspath(ckpt) != os.path.abspath(path)
    if not fallback or not is_run_dir:
        hint = " (--no-checkpoint-fallback)" if is_run_dir else ""
        raise CheckpointLoadError(f"checkpoint {ckpt} cannot be loaded{hint}:\n  {details}")
    log(f"WARNING: checkpoint {ckpt} is damaged:\n  {details}")
    for older in _older_checkpoints(path, ckpt):
        older_problems = verify_checkpoint(older, trust)
        if older_problems:
            log(f"WARNING: the older checkpoint {older} does not verify either:\n  " + "\n  ".join(older_problems))
            continue
        if not dist.is_initialized() or dist.get_rank() == 0:
            aside = f"{ckpt}.damaged"
            if os.path.exists(aside):
                aside = f"{ckpt}.damaged-{int(time.time())}"
            os.rename(ckpt, aside)
            _write_marker(path, int(os.path.basename(older)[5:]))
            log(f"WARNING: falling back to {older} (the damaged checkpoint is kept as {aside}; the marker now names {older})")
        if dist.is_initialized():
            dist.barrier()
        return older
    raise CheckpointLoadError(f"checkpoint {ckpt} is damaged and no older checkpoint of {path} verifies:\n  {details}")


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


OPTIMIZER_METADATA = {"distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING_TYPE}


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
        prepare_optimizer_state(contents.optimizer)
        state["optimizer"] = contents.optimizer.sharded_state_dict(state, is_loading=loading, metadata=OPTIMIZER_METADATA)
    if contents.scheduler is not None and not loading:
        state["scheduler"] = contents.scheduler.state_dict()
    if contents.run_state is not None and not loading:
        state["run_state"] = contents.run_state
    return state


def save_checkpoint(save_dir: str, iteration: int, chunks, contents: CheckpointContents, dp_group=None, finish=None,
                    on_complete=None, async_queue=None) -> str:
    """Write ``iter_XXXXXXX`` on all ranks, then its manifest, then (rank 0) point the marker at it.

    Args:
        finish: called on rank 0 with the checkpoint directory once its tensors are written and
            before the manifest and the marker, for files that belong to the checkpoint.
        on_complete: called on every rank with the checkpoint directory once the marker names it.
        async_queue: megatron-core's ``AsyncCallsQueue`` (``--async-save``): the tensors are
            written by a forked process (a snapshot of this moment) and everything after them
            (``finish``, manifest, marker, ``on_complete``) runs when the queue finalizes the save,
            a collective step once every rank's write is complete. Without it all of this happens
            before the function returns.

    Returns:
        The checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    ckpt = iteration_dir(save_dir, iteration)
    if dist.get_rank() == 0:
        if os.path.isdir(ckpt) and _marker_target(save_dir) != ckpt:
            shutil.rmtree(ckpt)  # left by a save that never completed (the marker never named it)
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()

    def complete() -> None:
        stop_writer_manager()
        if finish is not None and dist.get_rank() == 0:
            finish(ckpt)  # extra files (architecture, run configuration, tokenizer) belong to the checkpoint
        dist.barrier()
        _write_manifest(ckpt)
        if os.environ.get(_KILL_BEFORE_MARKER_ENV) == str(iteration):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if dist.get_rank() == 0:
            _write_marker(save_dir, iteration)
        dist.barrier()
        if on_complete is not None:
            on_complete(ckpt)

    start_writer_manager()  # on CPU by fork, not spawn (compat/checkpoint_writer.py)
    state = _sharded_state(chunks, contents, loading=False)
    if async_queue is None:
        dist_checkpointing.save(state, ckpt, _strategies(None, dp_group))
        complete()
    else:
        from ..compat.async_save import async_save_kwargs

        request = dist_checkpointing.save(state, ckpt, _strategies(None, dp_group), async_sharded_save=True,
                                          **async_save_kwargs())  # fmt: skip
        request.add_finalize_fn(complete)
        async_queue.schedule_async_request(request)
    return ckpt


def prune_checkpoints(save_dir: str, keep_last: int) -> list[str]:
    """Delete all but the ``keep_last`` newest complete checkpoints of ``save_dir`` (rank 0).

    The checkpoint the marker names is never deleted, nor anything newer than it (a save in
    progress). Each is first renamed ``iter_XXXXXXX.deleting`` (atomic), then removed, so a run
    killed half-way leaves no half-deleted directory that looks like a checkpoint; leftovers are
    removed by the next call.

    Returns:
        The checkpoint directories deleted.
    """
    if keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {keep_last}")
    for name in os.listdir(save_dir):
        if name.endswith(".deleting"):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    latest = _marker_target(save_dir)
    if latest is None:
        return []
    complete = [latest, *_older_checkpoints(save_dir, latest)]  # newest first
    deleted = []
    for ckpt in reversed(complete[keep_last:]):  # oldest first
        doomed = ckpt + ".deleting"
        os.replace(ckpt, doomed)
        shutil.rmtree(doomed)
        deleted.append(ckpt)
    return deleted


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
    optimizer (see ``compat/optimizer_state.py``); the other crossings would fail deep inside
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
        load_optimizer_state(contents.optimizer, state["optimizer"])
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    return {k: common[k] for k in ("run_state", "scheduler") if k in common}
