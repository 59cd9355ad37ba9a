"""The reference model, one component with three implementations (``--ref-mode``):

- :class:`NoReference`: reference-free losses (SimPO, ORPO, SFT) read no reference log-probs;
- :class:`ReplicaReference`: a frozen copy of the policy runs forward-only each step (for TDPO it
  also keeps its final hidden states at the response positions: see training/step.py);
- :class:`CachedReference`: per-token log-probs computed once per reference version, memory-mapped
  from disk (:class:`~.reference_cache.ReferenceCache`, refused when computed for something else),
  so training holds one model.

Each answers the same three questions for the trainer: :meth:`Reference.on_step` (react to an
epoch boundary: Iterative SamPO makes the policy the reference; a cache is built when missing),
:meth:`Reference.attach` (put ``ref_logps`` on a step's micro-batches) and, for checkpoints,
:meth:`Reference.state` / :meth:`Reference.restore` and :attr:`Reference.saved_chunks`.

Where the reference comes from is a :class:`ReferenceSource`, recorded in the run state, so a
resumed run rebuilds exactly the reference it had.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import torch

from ..data import MicroBatch
from ..models.response_logits import output_weight
from ..models.weights import initialize_deterministically
from ..runtime.checkpointing import CheckpointContents, load_checkpoint, resolve_checkpoint
from ..runtime.distributed import ParallelInfo
from .feed import schedule_seq_length
from .metrics import format_duration
from .reference_cache import ReferenceCache, checkpoint_identity
from .step import StepContext, reference_forward_step


@dataclass(frozen=True)
class ReferenceSource:
    """Where the reference's weights come from."""

    kind: Literal["init", "checkpoint", "saved", "policy"]
    """init: the seeded random initialisation; checkpoint: a checkpoint directory (``--ref-load`` or
    the starting ``--load``); saved: the weights travel in every checkpoint (a replica after an
    Iterative update); policy: the policy at the start of the current epoch (a cache after an
    Iterative update: its log-probs are in the cache)."""
    path: str | None = None
    """The checkpoint directory (kind checkpoint)."""
    seed: int | None = None
    """The initialisation seed (kind init)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in {"kind": self.kind, "path": self.path, "seed": self.seed}.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> ReferenceSource:
        return cls(kind=data["kind"], path=data.get("path"), seed=data.get("seed"))


@dataclass
class ReferenceEnv:
    """What the reference implementations need from the run (no trainer object)."""

    ctx: StepContext
    par: ParallelInfo
    seq_length: int
    vocab_size: int
    policy: list
    """The policy's DDP-wrapped chunks (Iterative updates copy or run them)."""
    new_chunks: Callable[[], list]
    """Builds frozen model chunks of the policy's layout."""
    select: Callable[[str], str]
    """A checkpoint path -> the verified checkpoint directory to load."""
    message: Callable[[str], None]
    micro_batches: Callable[[int], list[MicroBatch]] | None = None
    """Step -> this rank's micro-batches (for building a cache)."""
    steps_per_epoch: int = 0
    iterative: bool = False
    """``--ref-update epoch``."""
    cache_fingerprint: dict | None = None
    """What a reference cache depends on besides the reference's weights: ``pairs``, ``tokenizer``,
    ``num_pairs``, ``seq_length`` (training/reference_cache.py)."""
    model_fingerprint: str = ""
    """The model's architecture: with the seed, the identity of a randomly initialised reference."""
    run_dir: str = ""
    """The run's --save: the identity of an Iterative reference (this run's policy at an epoch)."""


def forward_only_logps(chunks, micro_batches: list[MicroBatch], ctx: StepContext, seq_length: int,
                       keep_hidden: bool = False) -> list | None:  # fmt: skip
    """Per-token log-probs ``[2P, S]`` of each micro-batch through a forward-only pipeline schedule.

    Args:
        keep_hidden: also keep the final hidden states at the response positions (TDPO's reference).

    Returns:
        One tensor per micro-batch on the last pipeline stage (with ``keep_hidden``: a
        ``(log-probs, [n, 1, h] hidden states)`` pair), ``None`` on other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=partial(reference_forward_step, ctx, keep_hidden=keep_hidden),
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=schedule_seq_length(micro_batches, seq_length, ctx.packed),
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs if parallel_state.is_pipeline_last_stage() else None


@torch.no_grad()
def copy_weights(source_chunks, target_chunks) -> None:
    """Copy a model's weights into another with the same layout (Iterative reference update)."""
    for src, dst in zip(source_chunks, target_chunks):
        src = getattr(src, "module", src)  # unwrap megatron DDP
        for (name, s), (_, d) in zip(src.named_parameters(), dst.named_parameters()):
            d.copy_(s)


def materialise(chunks: list, source: ReferenceSource, env: ReferenceEnv, resume_ckpt: str | None) -> None:
    """Give ``chunks`` the weights ``source`` names."""
    if source.kind == "saved":
        if resume_ckpt is None:
            raise RuntimeError("the reference was saved with a checkpoint, but no checkpoint is being resumed")
        load_checkpoint(resume_ckpt, [], CheckpointContents(reference_chunks=chunks), env.par.dp_cp_group)
    elif source.kind == "checkpoint":
        load_checkpoint(env.select(source.path), chunks, CheckpointContents(), env.par.dp_cp_group)
    elif source.kind == "init":
        initialize_deterministically(chunks, seed=source.seed, vocab_size=env.vocab_size)
    else:
        raise ValueError(f"a {source.kind!r} reference has no weights to load")


def with_progress(steps, total: int, message: Callable[[str], None], every_s: float = 30.0):
    """Yield ``steps``, saying how far the cache's computation is every ``every_s`` seconds and when
    it is done (a large model's cache takes as long as a forward pass over the whole epoch)."""
    begin = last = time.monotonic()
    for done, step in enumerate(steps):
        now = time.monotonic()
        if done and now - last >= every_s:
            left = (now - begin) / done * (total - done)
            message(f"reference cache: {done}/{total} steps ({100 * done / total:.0f}%), ETA {format_duration(left)}")
            last = now
        yield step
    message(f"reference cache: {total} steps in {format_duration(time.monotonic() - begin)}")


class Reference:
    """The interface, and the reference-free implementation (:class:`NoReference`)."""

    chunks: list | None = None
    """The replica's model chunks, when there is one (the verbosity monitor evaluates them)."""

    def __init__(self, env: ReferenceEnv, source: ReferenceSource, version: int = 0) -> None:
        self.env = env
        self.source = source
        self.version = version
        """The epoch at which the reference was last set (Iterative: the current epoch)."""

    def state(self) -> dict:
        """Plain data for the run state of a checkpoint."""
        return {"reference_source": self.source.to_dict(), "reference_version": self.version}

    def restore(self, resume_ckpt: str | None) -> None:
        """Materialise the weights :attr:`source` names (``resume_ckpt``: the checkpoint being resumed)."""

    @property
    def saved_chunks(self) -> list | None:
        """Chunks whose weights must travel in the next checkpoint (None: rebuilt from the source)."""
        return None

    def on_step(self, epoch: int, step: int) -> None:
        """Called before each step: Iterative SamPO makes the current policy the reference at each new epoch."""
        if self.env.iterative and epoch > self.version:
            self.version = epoch
            self._become_policy()
            self.env.message(f"epoch {epoch}: reference updated to the current policy")

    def _become_policy(self) -> None:
        self.source = ReferenceSource("policy")

    def attach(self, micro_batches: list[MicroBatch]) -> None:
        """Put ``ref_logps`` on each micro-batch (on the ranks that compute the loss)."""

    def close(self) -> None:
        """Release what the reference holds open (the cache's mapped file)."""


class NoReference(Reference):
    """Reference-free losses (SimPO, ORPO, SFT): nothing to run, nothing to attach."""


class ReplicaReference(Reference):
    """A frozen copy of the policy, same TP/PP layout, forward-only each step, no optimizer state."""

    def __init__(self, env: ReferenceEnv, source: ReferenceSource, version: int = 0) -> None:
        super().__init__(env, source, version)
        self.chunks = env.new_chunks()

    def restore(self, resume_ckpt: str | None) -> None:
        materialise(self.chunks, self.source, self.env, resume_ckpt)

    @property
    def saved_chunks(self) -> list | None:
        return self.chunks if self.source.kind == "saved" else None

    def _become_policy(self) -> None:
        copy_weights(self.env.policy, self.chunks)
        self.source = ReferenceSource("saved")

    def attach(self, micro_batches: list[MicroBatch]) -> None:
        ctx = self.env.ctx
        outputs = forward_only_logps(self.chunks, micro_batches, ctx, self.env.seq_length, keep_hidden=ctx.token_kl)
        if outputs is None:
            return
        for batch, output in zip(micro_batches, outputs):
            if ctx.token_kl:
                batch["ref_logps"], batch["ref_hidden"] = output
            else:
                batch["ref_logps"] = output

    def output_weight(self) -> torch.Tensor:
        """The replica's output weight on the last pipeline stage (TDPO recomputes its logits)."""
        return output_weight(self.chunks[-1])


class CachedReference(Reference):
    """Reference log-probs read from a :class:`ReferenceCache` (``--ref-mode cache``), built when
    missing: once per reference version, in one forward-only pass over the epoch."""

    def __init__(self, env: ReferenceEnv, source: ReferenceSource, cache: ReferenceCache, version: int = 0) -> None:
        super().__init__(env, source, version)
        self.cache = cache
        self._ready_version: int | None = None
        """The version whose cache was found complete and matching (checked once, not every step)."""

    def fingerprint(self) -> dict:
        """What the cache of the current version is computed from (checked before it is read)."""
        source, env = self.source, self.env
        if source.kind == "checkpoint":
            reference = checkpoint_identity(resolve_checkpoint(source.path) or source.path)
        elif source.kind == "init":
            reference = f"init:seed={source.seed}:model={env.model_fingerprint}"
        else:  # this run's policy at the start of epoch `version`
            reference = f"policy:epoch={self.version}:run={os.path.abspath(env.run_dir)}"
        return {**(env.cache_fingerprint or {}), "reference": reference}

    def on_step(self, epoch: int, step: int) -> None:
        super().on_step(epoch, step)
        if self._ready_version == self.version:
            return
        if not self.cache.is_complete(self.version, self.fingerprint()):
            self._build(epoch, step)
        self._ready_version = self.version

    def _build(self, epoch: int, step: int) -> None:
        env = self.env
        if self.source.kind == "policy":
            if step != epoch * env.steps_per_epoch:
                raise RuntimeError(
                    f"the reference cache of epoch {self.version} is missing; an Iterative run's reference (the "
                    "policy at the epoch's start) cannot be rebuilt mid-epoch"
                )
            chunks = env.policy  # the reference is the policy as of now
        else:
            chunks = env.new_chunks()
            materialise(chunks, self.source, env, None)
        env.message(f"computing reference log-probs for the cache (version {self.version}) ...")
        spe = env.steps_per_epoch
        steps = with_progress((env.micro_batches(s) for s in range(epoch * spe, (epoch + 1) * spe)), spe, env.message)

        def compute(micro_batches):
            out = forward_only_logps(chunks, micro_batches, env.ctx, env.seq_length)
            return out if env.par.writes_results else None

        self.cache.build(self.version, steps, compute, self.fingerprint())

    def attach(self, micro_batches: list[MicroBatch]) -> None:
        if not self.env.par.is_last_stage:
            return
        cp = self.env.par.cp_size
        for batch in micro_batches:
            # the loss's rows, whole (each CP rank holds 1/cp of each sequence)
            width = batch["response_mask"].shape[1] * cp
            ref_logps = self.cache.lookup(self.version, batch["sample_ids"], width).to(batch["tokens"].device)
            if cp > 1:
                from megatron.core.utils import get_batch_on_this_cp_rank

                ref_logps = get_batch_on_this_cp_rank({"ref_logps": ref_logps})["ref_logps"]
            batch["ref_logps"] = ref_logps

    def close(self) -> None:
        self.cache.close()
