"""megatron-core ``forward_step_func`` / ``loss_func`` for the policy and the reference replica.

The data iterator yields :class:`~sampo_megatron.data.MicroBatch` es (chosen rows, then rejected rows
of the same pairs; ``ref_logps`` once the reference has run). Control values are arguments, bound
with ``functools.partial``: the epoch (the SamPO draws depend on it) and, from the forward to the
loss, whether the logits are compact (response positions only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..data import MicroBatch
from ..losses import LossConfig, PreferenceInputs, RunningMean, preference_loss
from ..models.response_logits import select_output_positions
from ..ops import vocab_parallel_logprobs


@dataclass
class StepContext:
    """What the loss needs beyond the micro-batch."""

    loss: LossConfig
    tp_group: object
    vocab_size: int
    """Real vocabulary size: the TP padding columns are left out of the softmax."""
    reward_mean: RunningMean | None = None
    cp_group: object = None
    """Context-parallel group: the micro-batch holds this rank's slice of each sequence."""
    response_logits_only: bool = False
    """Project through the output layer only the positions whose target is a response token."""


def _model_logits(ctx: StepContext, batch: MicroBatch, model) -> tuple[torch.Tensor, bool]:
    """``([2P, S, V/TP] logits, False)``, or with ``ctx.response_logits_only`` (on the stage that has
    the output layer) ``([1, n, V/TP] logits at the n response positions, True)`` (see
    :func:`token_logprobs`)."""
    compact = False
    if ctx.response_logits_only:
        # [s, b] order: megatron's activations are sequence-first.
        compact = select_output_positions(model, batch["response_mask"].t())
    # Causal attention needs no explicit mask; right padding only follows the real tokens.
    return model(batch["tokens"], batch["position_ids"], None), compact


def token_logprobs(
    batch: MicroBatch, logits: torch.Tensor, ctx: StepContext, *, compact: bool, inplace_backward: bool
) -> torch.Tensor:
    """``[2P, S]`` per-token log-probs of the labels.

    From ``[2P, S, V/TP]`` logits; or from compact ``[1, n, V/TP]`` logits at the response positions
    (``response_mask.t().nonzero()`` order), scattered back to ``[2P, S]`` with zeros elsewhere
    (the loss reads log-probs only under ``response_mask``).
    """
    labels = batch["labels"]
    if not compact:
        return vocab_parallel_logprobs(logits, labels, ctx.tp_group, inplace_backward=inplace_backward, vocab_size=ctx.vocab_size)
    seq_pos, row = batch["response_mask"].t().nonzero(as_tuple=True)  # the compact logits' [s, b] order
    compact = vocab_parallel_logprobs(
        logits.reshape(-1, logits.shape[-1]), labels[row, seq_pos], ctx.tp_group,
        inplace_backward=inplace_backward, vocab_size=ctx.vocab_size,
    )  # fmt: skip
    # A contiguous [2P, S] result, laid out as the full-logit path's (sums then add in the same order).
    rows, cols = labels.shape
    return compact.new_zeros(rows * cols).index_copy(0, row * cols + seq_pos, compact).view(rows, cols)


def policy_forward_step(ctx: StepContext, epoch: int, data_iterator, model):
    """Forward of the policy on one micro-batch; the loss runs on the last pipeline stage."""
    batch = next(data_iterator)
    logits, compact = _model_logits(ctx, batch, model)
    return logits, partial(_policy_loss, ctx, epoch, batch, compact)


def _policy_loss(ctx: StepContext, epoch: int, batch: MicroBatch, compact: bool, logits: torch.Tensor):
    # The logits are not needed after this op, so its backward may overwrite them with the gradient.
    logps = token_logprobs(batch, logits, ctx, compact=compact, inplace_backward=True)
    out = preference_loss(
        PreferenceInputs(
            logps, batch["response_mask"], batch["sample_ids"], batch.get("ref_logps"),
            response_index=batch.get("response_index"),
        ),
        ctx.loss,
        epoch=epoch,
        cp_group=ctx.cp_group,
        reward_mean=ctx.reward_mean,
    )  # fmt: skip
    loss = out.losses.mean()
    # Sums over this micro-batch's pairs; the trainer divides by the global pair count.
    # (The schedule divides `loss` in place, so the metrics must not alias it.)
    sums = {name: value.detach().double().sum() for name, value in out.metrics.items()}
    return loss, {"sums": sums, "pairs": out.losses.numel()}


def reference_forward_step(ctx: StepContext, data_iterator, model):
    """Forward-only pass of the reference: collects per-token log-probs (``non_loss_data``)."""
    batch = next(data_iterator)
    logits, compact = _model_logits(ctx, batch, model)
    return logits, partial(_reference_logps, ctx, batch, compact)


def _reference_logps(ctx: StepContext, batch: MicroBatch, compact: bool, logits: torch.Tensor, non_loss_data: bool = True):
    return token_logprobs(batch, logits, ctx, compact=compact, inplace_backward=False).detach()
