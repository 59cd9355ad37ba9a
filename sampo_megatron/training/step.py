"""megatron-core ``forward_step_func`` / ``loss_func`` for the policy and the reference replica.

The data iterator yields :class:`~sampo_megatron.data.MicroBatch` es (chosen rows, then rejected rows
of the same pairs; ``ref_logps`` once the reference has run). Control values are arguments, bound
with ``functools.partial``: the epoch (the SamPO draws depend on it) and, from the forward to the
loss, whether the logits are compact (response positions only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import MicroBatch
from ..data.packing import packed_seq_params, to_loss_rows
from ..losses import LossConfig, PreferenceInputs, RunningMean, preference_loss
from ..models.response_logits import keep_output_input, output_weight, select_output_positions
from ..ops import fused_linear_logprobs, vocab_parallel_kl, vocab_parallel_logprobs


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
    fused_logprobs: bool = False
    """Log-probs from the selected final hidden states and the output weight, chunk by chunk
    (ops/fused_logprobs.py): the output layer returns its input, no logits exist."""
    fused_chunk_size: int | None = None
    """Positions per chunk of the fused op (``--fused-logprobs-chunk-size``); None: its default."""
    packed: bool = False
    """The micro-batches are packed (``RunPlan.pack_sequences``): their model fields are one row of
    whole sequences laid end to end (data/packing.py). A micro-batch of the other kind is an error."""
    ref_output_weight: Callable[[], torch.Tensor] | None = None
    """TDPO: the reference's ``[V/TP, h]`` output weight. The loss then needs the per-token
    ``KL(pi_ref || pi_theta)``: the reference's forward keeps its final hidden states at the response
    positions (``ref_hidden``) and the policy's loss projects them through this weight, one
    micro-batch at a time."""

    @property
    def token_kl(self) -> bool:
        return self.ref_output_weight is not None


def _check_layout(ctx: StepContext, batch: MicroBatch) -> None:
    """A micro-batch laid out as the step's context says (packed or padded), or a loud error."""
    if ctx.packed != ("cu_seqlens" in batch):
        kind = "packed" if "cu_seqlens" in batch else "padded"
        raise RuntimeError(f"a {kind} micro-batch in a step of {'packed' if ctx.packed else 'padded'} micro-batches")


def _model_logits(ctx: StepContext, batch: MicroBatch, model) -> tuple[torch.Tensor, bool]:
    """``([2P, S, V/TP] logits, False)``, or with ``ctx.response_logits_only`` (on the stage that has
    the output layer) ``([1, n, V/TP] logits at the n response positions, True)``, with
    ``ctx.fused_logprobs`` ``([1, n, h] final hidden states there, True)`` (see :func:`token_logprobs`)."""
    _check_layout(ctx, batch)
    compact = False
    if ctx.response_logits_only:
        # [s, b] order: megatron's activations are sequence-first.
        compact = select_output_positions(model, _model_response_mask(ctx, batch).t(), project=not ctx.fused_logprobs)
    # Causal attention needs no explicit mask; right padding only follows the real tokens. A packed
    # row's sequences are told apart by cu_seqlens (THD).
    packed = packed_seq_params(batch) if ctx.packed else None
    return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed), compact


def _model_response_mask(ctx: StepContext, batch: MicroBatch) -> torch.Tensor:
    """``response_mask`` in the model's layout (the packed row's for a packed micro-batch)."""
    return batch["packed_response_mask"] if ctx.packed else batch["response_mask"]


def token_logprobs(
    batch: MicroBatch, logits: torch.Tensor, ctx: StepContext, *, compact: bool, inplace_backward: bool,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[2P, S]`` per-token log-probs of the labels, in the loss's rows.

    From ``[2P, S, V/TP]`` logits; or from compact ``[1, n, V/TP]`` logits at the response positions
    (``response_mask.t().nonzero()`` order), scattered back to ``[2P, S]`` with zeros elsewhere
    (the loss reads log-probs only under ``response_mask``); or, with ``ctx.fused_logprobs``, from
    the ``[1, n, h]`` final hidden states there and the ``[V/TP, h]`` output ``weight``, without
    logits (ops/fused_logprobs.py). A packed micro-batch's log-probs are computed in its packed row
    and gathered into the loss's rows (data/packing.py).
    """
    labels = batch["labels"]
    if compact and ctx.fused_logprobs:
        seq_pos, row = _response_positions(ctx, batch)
        values = fused_linear_logprobs(logits.reshape(-1, logits.shape[-1]), weight, labels[row, seq_pos], ctx.tp_group,
                                       vocab_size=ctx.vocab_size, chunk_size=ctx.fused_chunk_size)  # fmt: skip
        return _scatter_to_rows(values, batch, ctx)
    if not compact:
        values = vocab_parallel_logprobs(logits, labels, ctx.tp_group, inplace_backward=inplace_backward, vocab_size=ctx.vocab_size)
        return to_loss_rows(values, batch)
    seq_pos, row = _response_positions(ctx, batch)
    values = vocab_parallel_logprobs(
        logits.reshape(-1, logits.shape[-1]), labels[row, seq_pos], ctx.tp_group,
        inplace_backward=inplace_backward, vocab_size=ctx.vocab_size,
    )  # fmt: skip
    return _scatter_to_rows(values, batch, ctx)


def _response_positions(ctx: StepContext, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence position, row)`` of each response position in the model's layout, in the compact
    logits' ``[s, b]`` order."""
    return _model_response_mask(ctx, batch).t().nonzero(as_tuple=True)


def _scatter_to_rows(values: torch.Tensor, batch: MicroBatch, ctx: StepContext) -> torch.Tensor:
    """``[n]`` values at the response positions -> the loss's ``[2P, S]`` rows, zeros elsewhere: a
    contiguous result, laid out as the full-logit path's (sums then add in the same order)."""
    seq_pos, row = _response_positions(ctx, batch)
    rows, cols = batch["labels"].shape
    return to_loss_rows(values.new_zeros(rows * cols).index_copy(0, row * cols + seq_pos, values).view(rows, cols), batch)


def token_kl(batch: MicroBatch, logits: torch.Tensor, ctx: StepContext, *, compact: bool) -> torch.Tensor:
    """``[2P, S]`` per-token ``KL(pi_ref || pi_theta)`` at the response positions (zeros elsewhere),
    over the real vocabulary (TDPO, Zeng et al. 2024, Eq. 4).

    The reference's logits are recomputed here from its kept final hidden states ``ref_hidden``
    (``[n, 1, h]``) and its output weight: ``[n, V/TP]`` for this micro-batch only.
    """
    seq_pos, row = _response_positions(ctx, batch)
    vocab_local = logits.shape[-1]
    policy = logits.reshape(-1, vocab_local) if compact else logits[row, seq_pos]
    ref_logits = F.linear(batch["ref_hidden"].reshape(-1, batch["ref_hidden"].shape[-1]), ctx.ref_output_weight())
    if ref_logits.shape != policy.shape:
        raise ValueError(f"reference logits {tuple(ref_logits.shape)} and policy logits {tuple(policy.shape)} differ")
    return _scatter_to_rows(vocab_parallel_kl(ref_logits, policy, ctx.tp_group, vocab_size=ctx.vocab_size), batch, ctx)


def policy_forward_step(ctx: StepContext, epoch: int, data_iterator, model):
    """Forward of the policy on one micro-batch; the loss runs on the last pipeline stage."""
    batch = next(data_iterator)
    logits, compact = _model_logits(ctx, batch, model)
    return logits, partial(_policy_loss, ctx, epoch, batch, compact, weight=_fused_weight(ctx, model, compact))


def _fused_weight(ctx: StepContext, model, compact: bool) -> torch.Tensor | None:
    """The output weight the fused log-prob op projects with (the chunk returned hidden states)."""
    return output_weight(model) if ctx.fused_logprobs and compact else None


def _policy_loss(ctx: StepContext, epoch: int, batch: MicroBatch, compact: bool, logits: torch.Tensor,
                 weight: torch.Tensor | None = None):  # fmt: skip
    # Unless TDPO's KL reads them too, the logits are not needed after this op, so its backward may
    # overwrite them with the gradient.
    logps = token_logprobs(batch, logits, ctx, compact=compact, inplace_backward=not ctx.token_kl, weight=weight)
    kl = token_kl(batch, logits, ctx, compact=compact) if ctx.token_kl else None
    out = preference_loss(
        PreferenceInputs(
            logps, batch["response_mask"], batch["sample_ids"], batch.get("ref_logps"), token_kl=kl,
            response_index=batch.get("response_index"),
        ),
        ctx.loss,
        epoch=epoch,
        cp_group=ctx.cp_group,
        reward_mean=ctx.reward_mean,
    )  # fmt: skip
    # A packed micro-batch holds a varying number of pairs: its loss is scaled so that, after the
    # schedule's mean over micro-batches and DP, every pair of the global batch weighs the same.
    loss = out.losses.sum() * batch["loss_scale"] if ctx.packed else out.losses.mean()
    # Sums over this micro-batch's pairs; the trainer divides by the global pair count.
    # (The schedule divides `loss` in place, so the metrics must not alias it.)
    sums = {name: value.detach().double().sum() for name, value in out.metrics.items()}
    return loss, {"sums": sums, "pairs": out.losses.numel()}


def reference_forward_step(ctx: StepContext, data_iterator, model, keep_hidden: bool = False):
    """Forward-only pass of the reference: collects per-token log-probs (``non_loss_data``), and with
    ``keep_hidden`` (TDPO) also the final hidden states at the response positions."""
    batch = next(data_iterator)
    kept = keep_output_input(model) if keep_hidden else None
    logits, compact = _model_logits(ctx, batch, model)
    if kept is not None and not compact:
        raise RuntimeError("keeping the reference's hidden states needs --response-logits-only")
    return logits, partial(_reference_logps, ctx, batch, compact, kept, weight=_fused_weight(ctx, model, compact))


def _reference_logps(ctx: StepContext, batch: MicroBatch, compact: bool, kept: list | None, logits: torch.Tensor,
                     non_loss_data: bool = True, weight: torch.Tensor | None = None):  # fmt: skip
    logps = token_logprobs(batch, logits, ctx, compact=compact, inplace_backward=False, weight=weight).detach()
    return logps if kept is None else (logps, kept[0])
