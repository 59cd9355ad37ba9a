"""Where a run starts: a fresh initialisation, the weights of ``--load``, or a resume of the
checkpoint's run (its own ``--save`` directory, or ``--load`` of a run without ``--finetune``).

A resume restores model, optimizer, scheduler and the :class:`RunState` (data position, reference
source, loss state), after checking that the run's configuration did not change what the
checkpoint's run was computing (training/run_config.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import RunConfig
from ..models.weights import initialize_deterministically
from ..runtime.checkpointing import (
    CheckpointContents,
    CheckpointLoadError,
    check_optimizer_state,
    has_key,
    load_checkpoint,
    resolve_checkpoint,
)
from .run_config import check_resume, read_run_config


@dataclass
class RunState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""

    iteration: int = 0
    """Optimizer steps completed."""
    reference_source: dict = field(default_factory=dict)
    """training/reference.py's ReferenceSource, as plain data."""
    reference_version: int = 0
    """Epoch at which the reference was last set (Iterative: the current epoch)."""
    reward_mean: dict = field(default_factory=lambda: {"total": 0.0, "count": 0})
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient (--skip-nonfinite-steps)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StartingPoint:
    """What :func:`start` decided and loaded."""

    state: RunState
    resumed_from: str | None = None
    """The checkpoint resumed (its run continues), or None."""


def start(cfg: RunConfig, chunks: list, optimizer, scheduler, reward_mean, *, select, run_record: dict, vocab_size: int,
          dp_group, message) -> StartingPoint:  # fmt: skip
    """Initialise, load or resume the policy (and optimizer, scheduler, loss state).

    Args:
        cfg: the run's configuration.
        chunks: the policy's model chunks (unwrapped).
        optimizer, scheduler: megatron-core's, restored on a resume.
        reward_mean: the loss's running reward mean, restored on a resume.
        select: a checkpoint path -> the verified checkpoint directory (or None when there is none).
        run_record: this run's resolved configuration (compared with the checkpoint's on a resume).
        vocab_size: the model's vocabulary (the initialisation leaves the padding rows at zero).
        dp_group: the group checkpoints are read over.
        message: prints on one rank.

    Raises:
        CheckpointLoadError: ``--load`` holds no checkpoint.
        ConfigChangeError: a resume would change the objective, the data or (without
            ``--override-opt-param-scheduler``) the schedule.
    """
    ckpt, resuming = None, False
    for candidate in (cfg.checkpoint.save, cfg.checkpoint.load):  # a run resumes from its own --save first
        if candidate and (ckpt := select(candidate)) is not None:
            resuming = candidate == cfg.checkpoint.save or (not cfg.checkpoint.finetune and has_key(ckpt, "run_state"))
            break
    if ckpt is None and cfg.checkpoint.load:
        raise CheckpointLoadError(f"--load {cfg.checkpoint.load}: no checkpoint there")

    state = RunState()
    if ckpt is None:
        initialize_deterministically(chunks, seed=cfg.training.seed, vocab_size=vocab_size)
        state.reference_source = {"kind": "init", "seed": cfg.training.seed}
    elif not resuming:
        _timed(message, ckpt, "the weights of", lambda: load_checkpoint(ckpt, chunks, CheckpointContents(), dp_group))
        state.reference_source = {"kind": "checkpoint", "path": os.path.abspath(ckpt)}
    else:
        for line in check_resume(read_run_config(ckpt), run_record, ckpt, cfg.checkpoint.override_opt_param_scheduler):
            message(line)
        check_optimizer_state(ckpt, cfg.parallel.use_distributed_optimizer, cfg.precision.bf16 or cfg.precision.fp16)
        common = _timed(message, ckpt, "", lambda: load_checkpoint(ckpt, chunks, CheckpointContents(optimizer=optimizer), dp_group))
        state = RunState(**common["run_state"])
        scheduler.load_state_dict(common["scheduler"])
        if cfg.checkpoint.override_opt_param_scheduler:
            _apply_optimizer_flags(cfg, optimizer)
        reward_mean.load_state_dict(state.reward_mean)
    if not resuming:
        # Mixed-precision and distributed optimizers hold fp32 main copies made at construction.
        optimizer.reload_model_params()
    if cfg.reference.ref_load and state.reference_source.get("kind") != "saved":
        path = resolve_checkpoint(cfg.reference.ref_load) or cfg.reference.ref_load
        state.reference_source = {"kind": "checkpoint", "path": os.path.abspath(path)}
    return StartingPoint(state, ckpt if resuming else None)


def _timed(message: Callable[[str], None], ckpt: str, what: str, load: Callable[[], dict]) -> dict:
    """Say that ``ckpt`` is being loaded and how long it took (a large model's load takes minutes)."""
    message(f"loading {what + ' ' if what else ''}{ckpt} ...")
    begin = time.monotonic()
    loaded = load()
    message(f"loaded {ckpt} in {time.monotonic() - begin:.1f} s")
    return loaded


def _apply_optimizer_flags(cfg: RunConfig, optimizer) -> None:
    """--override-opt-param-scheduler: Adam's hyper-parameters from the flags, not the checkpoint's
    param groups (the scheduler sets learning rate and weight decay at every step)."""
    opt = cfg.optimizer
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (opt.adam_beta1, opt.adam_beta2)
        if "eps" in group:
            group["eps"] = opt.adam_eps
