"""Per-token log-probabilities and KL divergences over vocabulary shards, without a vocabulary gather.

Each tensor-parallel rank holds logits ``z[..., V/TP]`` for its slice ``[v0, v0 + V/TP)`` of the
vocabulary. For target ``y`` the log-probability is

    log p(y) = z_y - logsumexp_v z_v,   logsumexp_v z_v = M + log sum_r sum_{v in shard r} exp(z_v - M)

with ``M`` the global max. Each chunk of positions is reduced locally against its *local* max
``m_r`` (``s_r = sum exp(z - m_r)``), then ``M = allreduce_max(m_r)`` and
``S = allreduce_sum(s_r * exp(m_r - M))``: one pass over the logits and two small all-reduces for the
whole tensor. The target logit comes from the rank that owns it (zero elsewhere, summed).

Backward: ``d log p(y) / dz_v = 1[v = y] - softmax(z)_v``, recomputed chunk by chunk from the saved
logits and the per-position logsumexp, so no fp32 copy of the vocabulary is ever kept. With
``inplace_backward=True`` the gradient is written into the logits' own storage (the logits must not
be needed by anything else afterwards, as with the output layer's activations).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024  # fp32 working set per chunk


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _vocab_start(vocab_local: int, group) -> int:
    if _group_size(group) == 1:
        return 0
    return dist.get_rank(group) * vocab_local


def _chunk_rows(num_rows: int, vocab_local: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        # ~32 MiB of fp32 per chunk, and at least 8 chunks so small inputs keep a small working set too.
        chunk_size = min(_DEFAULT_CHUNK_BYTES // (4 * vocab_local), -(-num_rows // 8))
    return max(1, min(num_rows, chunk_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 logits; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local_target(target: torch.Tensor, vocab_start: int, vocab_local: int):
    """Index of each target inside this shard (clamped) and whether this shard owns it."""
    local = target - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), owned


def _reduce_chunk(chunk: torch.Tensor, rows: slice, local_target, owned, local_max, sum_exp_and_target) -> None:
    """Fill ``rows`` of the per-position statistics from one chunk of fp32 logits: the local max,
    the target's logit where this shard owns it, and the sum of ``exp(z - max)`` (``chunk`` is
    overwritten)."""
    chunk_max = chunk.max(dim=-1).values
    local_max[rows] = chunk_max
    picked = chunk.gather(1, local_target[rows, None]).squeeze(1)
    sum_exp_and_target[1, rows] = torch.where(owned[rows], picked, 0.0)
    sum_exp_and_target[0, rows] = chunk.sub_(chunk_max[:, None]).exp_().sum(dim=-1)


def _global_logprobs(local_max, sum_exp_and_target, valid, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probs, logsumexp)`` per position from every shard's statistics: two all-reduces.
    A shard without real columns (all TP padding) has local max -inf and adds nothing."""
    global_max = local_max.clone()
    _all_reduce(global_max, dist.ReduceOp.MAX, tp_group)
    sum_exp_and_target[0] *= torch.where(torch.isinf(local_max), 0.0, (local_max - global_max).exp())
    _all_reduce(sum_exp_and_target, dist.ReduceOp.SUM, tp_group)
    logsumexp = global_max + sum_exp_and_target[0].log()
    return torch.where(valid, sum_exp_and_target[1] - logsumexp, 0.0), logsumexp


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, chunk_size, inplace_backward, vocab_size):
        vocab_local = logits.shape[-1]
        lead_shape = logits.shape[:-1]
        flat = logits.reshape(-1, vocab_local)
        flat_target = target.reshape(-1)
        valid = flat_target >= 0
        vocab_start = _vocab_start(vocab_local, tp_group)
        # Columns past the real vocabulary (TP padding) take no part in the softmax.
        n_real = vocab_local if vocab_size is None else max(0, min(vocab_local, vocab_size - vocab_start))
        local_target, owned = _local_target(flat_target, vocab_start, n_real)
        owned &= valid

        rows = flat.shape[0]
        acc = _compute_dtype(logits.dtype)
        local_max = torch.full((rows,), float("-inf"), dtype=acc, device=flat.device)
        sum_exp_and_target = torch.zeros(2, rows, dtype=acc, device=flat.device)
        step = _chunk_rows(rows, vocab_local, chunk_size)
        workspace = torch.empty(step, n_real, dtype=acc, device=flat.device)  # reused by every chunk
        for start in range(0, rows if n_real else 0, step):
            end = min(start + step, rows)
            chunk = workspace[: end - start]
            chunk.copy_(flat[start:end, :n_real])
            _reduce_chunk(chunk, slice(start, end), local_target, owned, local_max, sum_exp_and_target)
        del workspace
        logprobs, logsumexp = _global_logprobs(local_max, sum_exp_and_target, valid, tp_group)

        ctx.save_for_backward(logits, local_target, owned, valid, logsumexp)
        ctx.step = step
        ctx.inplace_backward = inplace_backward
        ctx.n_real = n_real
        return logprobs.reshape(lead_shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits, local_target, owned, valid, logsumexp = ctx.saved_tensors
        vocab_local = logits.shape[-1]
        flat = logits.reshape(-1, vocab_local)
        acc = _compute_dtype(logits.dtype)
        grad_rows = grad_output.reshape(-1).to(acc) * valid
        if ctx.inplace_backward:
            grad_flat = flat
        else:
            grad_flat = torch.empty_like(flat)
        step, n_real = ctx.step, ctx.n_real
        # When the gradient has the accumulation dtype, each chunk is computed straight in its
        # storage (no workspace, no extra copy); otherwise one fp32 workspace chunk is reused.
        direct = grad_flat.dtype == acc
        workspace = None if direct else torch.empty(min(step, flat.shape[0]), n_real, dtype=acc, device=flat.device)
        if n_real < vocab_local:
            grad_flat[:, n_real:] = 0
        for start in range(0, flat.shape[0] if n_real else 0, step):
            end = min(start + step, flat.shape[0])
            g = grad_rows[start:end]
            grad_chunk = grad_flat[start:end, :n_real]
            if direct:
                chunk = grad_chunk if ctx.inplace_backward else grad_chunk.copy_(flat[start:end, :n_real])
            else:
                chunk = workspace[: end - start].copy_(flat[start:end, :n_real])
            # -(softmax * g) in the accumulation dtype, then +g at the owned target.
            chunk.sub_(logsumexp[start:end, None]).exp_().mul_(-g[:, None])
            chunk.scatter_add_(1, local_target[start:end, None], (g * owned[start:end])[:, None])
            if not direct:
                grad_chunk.copy_(chunk)
        return grad_flat.view(logits.shape), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    *,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``log softmax(logits)[target]`` with the vocabulary sharded over ``tp_group``.

    Args:
        logits: ``[..., V/TP]`` this rank's vocabulary shard (any float dtype; reductions in fp32).
            Rank ``r`` of ``tp_group`` owns vocabulary ids ``[r * V/TP, (r + 1) * V/TP)``.
        target: ``[...]`` global token ids, same leading shape. Negative ids (e.g. -100) mark
            ignored positions: their log-prob is 0 and they get no gradient.
        tp_group: tensor-parallel process group; ``None`` or a group of size 1 means the whole
            vocabulary is local.
        chunk_size: positions processed at once; by default ~32 MiB of fp32 logits and at least 8 chunks.
        inplace_backward: write the gradient into ``logits``' storage in backward. Only safe when
            nothing else reads those logits after this op's backward.
        vocab_size: the real vocabulary size when the logits carry megatron's TP padding: columns
            with global id ``>= vocab_size`` are left out of the softmax and get zero gradient.

    Returns:
        ``[...]`` fp32 (float64 for float64 logits) log-probabilities, identical on every rank of ``tp_group``.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} leading shapes differ")
    return _VocabParallelLogProbs.apply(logits.contiguous(), target, tp_group, chunk_size, inplace_backward, vocab_size)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ref_logits, policy_logits, tp_group, chunk_size):
        vocab_local = policy_logits.shape[-1]
        lead_shape = policy_logits.shape[:-1]
        rows = math.prod(lead_shape)
        ref_flat = ref_logits.reshape(rows, vocab_local)
        pol_flat = policy_logits.reshape(rows, vocab_local)
        # per row: local max of ref and policy; sum exp(ref - m_ref), sum exp(ref - m_ref) * (ref - pol),
        # sum exp(pol - m_pol)
        acc = _compute_dtype(policy_logits.dtype)
        # A shard of TP padding only (no real column) adds nothing: max -inf, sums 0.
        maxes = torch.full((2, rows), -math.inf, dtype=acc, device=pol_flat.device)
        sums = torch.zeros(3, rows, dtype=acc, device=pol_flat.device)
        step = _chunk_rows(rows, max(1, vocab_local), chunk_size)
        for start in range(0, rows if vocab_local else 0, step):
            end = min(start + step, rows)
            ref = ref_flat[start:end].to(acc)
            pol = pol_flat[start:end].to(acc)
            ref_max = ref.max(dim=-1).values
            pol_max = pol.max(dim=-1).values
            maxes[0, start:end] = ref_max
            maxes[1, start:end] = pol_max
            ref_weights = (ref - ref_max[:, None]).exp()
            sums[0, start:end] = ref_weights.sum(dim=-1)
            sums[1, start:end] = (ref_weights * (ref - pol)).sum(dim=-1)
            sums[2, start:end] = (pol - pol_max[:, None]).exp_().sum(dim=-1)
            del ref, pol, ref_weights

        global_maxes = maxes.clone()
        _all_reduce(global_maxes, dist.ReduceOp.MAX, tp_group)
        rescale = (maxes - global_maxes).exp_()
        sums[0] *= rescale[0]
        sums[1] *= rescale[0]
        sums[2] *= rescale[1]
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        ref_lse = global_maxes[0] + sums[0].log()
        pol_lse = global_maxes[1] + sums[2].log()
        # KL(ref || pol) = E_ref[ref - pol] - lse_ref + lse_pol
        kl = sums[1] / sums[0] - ref_lse + pol_lse

        ctx.save_for_backward(ref_logits, policy_logits, ref_lse, pol_lse)
        ctx.step = step
        return kl.reshape(lead_shape)

    @staticmethod
    def backward(ctx, grad_output):
        ref_logits, policy_logits, ref_lse, pol_lse = ctx.saved_tensors
        vocab_local = policy_logits.shape[-1]
        rows = math.prod(policy_logits.shape[:-1])
        ref_flat = ref_logits.reshape(rows, vocab_local)
        pol_flat = policy_logits.reshape(rows, vocab_local)
        acc = _compute_dtype(policy_logits.dtype)
        grad_rows = grad_output.reshape(-1).to(acc)
        grad_flat = torch.empty_like(pol_flat)
        step = ctx.step
        for start in range(0, pol_flat.shape[0], step):
            end = min(start + step, pol_flat.shape[0])
            # dKL/dz_pol = softmax(pol) - softmax(ref)
            pol_probs = pol_flat[start:end].to(acc, copy=True).sub_(pol_lse[start:end, None]).exp_()
            ref_probs = ref_flat[start:end].to(acc, copy=True).sub_(ref_lse[start:end, None]).exp_()
            grad_flat[start:end] = pol_probs.sub_(ref_probs).mul_(grad_rows[start:end, None])
            del pol_probs, ref_probs
        return None, grad_flat.view(policy_logits.shape), None, None


def vocab_parallel_kl(
    ref_logits: torch.Tensor,
    policy_logits: torch.Tensor,
    tp_group=None,
    *,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``KL(pi_ref || pi_theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))`` over shards.

    This is TDPO's per-position divergence (Zeng et al., 2024, Eq. 4). The reference is frozen:
    gradient flows to ``policy_logits`` only, ``dKL/dz_theta = softmax(z_theta) - softmax(z_ref)``.

    Args:
        ref_logits: ``[..., V/TP]`` reference logits shard.
        policy_logits: ``[..., V/TP]`` policy logits shard, same shape.
        tp_group: tensor-parallel process group (``None``: whole vocabulary local).
        chunk_size: positions processed at once.
        vocab_size: the real vocabulary size when the logits carry megatron's TP padding: columns
            with global id ``>= vocab_size`` are left out of both distributions and get zero gradient.

    Returns:
        ``[...]`` fp32 per-position KL, identical on every rank of ``tp_group``.
    """
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(f"ref {tuple(ref_logits.shape)} and policy {tuple(policy_logits.shape)} shapes differ")
    if ref_logits.requires_grad:
        ref_logits = ref_logits.detach()
    vocab_local = policy_logits.shape[-1]
    if vocab_size is not None:
        n_real = max(0, min(vocab_local, vocab_size - _vocab_start(vocab_local, tp_group)))
        ref_logits, policy_logits = ref_logits[..., :n_real], policy_logits[..., :n_real]
    return _VocabParallelKL.apply(ref_logits.contiguous(), policy_logits.contiguous(), tp_group, chunk_size)
