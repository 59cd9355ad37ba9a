"""Per-token log-probabilities straight from the final hidden states: the output layer and the
log-softmax fused and chunked, so that the ``[n, V/TP]`` logits never exist whole.

For hidden states ``x [n, h]`` (the same on every tensor-parallel rank) and this rank's rows
``W [V/TP, h]`` of the output weight (vocabulary ids ``[r V/TP, (r + 1) V/TP)`` on rank ``r``),

    z = x W^T,    log p(y_i) = z_{i, y_i} - logsumexp_v z_{i, v}

is computed ``chunk`` positions at a time: a chunk's logits give their local max, their sum of
exponentials against it and the target's logit, and are dropped. The tensor-parallel logsumexp then
needs the two small all-reduces of :mod:`.vocab_parallel` for the whole tensor. Backward recomputes
each chunk's logits from ``x`` and ``W``:

    dL/dz_{i,v} = g_i (1[v = y_i] - softmax(z_i)_v),   dL/dx = sum_TP dL/dz W,   dL/dW = dL/dz^T x

so neither pass holds more than one chunk of ``[chunk, V/TP]`` values (the idea of NeMo-RL's
``ChunkedDistributedHiddenStatesToLogprobs``, Liger-Kernel's fused linear losses and Cut
Cross-Entropy). One of the two gradients is a sum over chunks and is accumulated in fp32: backward
chunks the positions (accumulating ``dL/dW``, ``[V/TP, h]``) or the vocabulary (accumulating
``dL/dx``, ``[n, h]``), whichever of ``n`` and ``V/TP`` is smaller. The logits are computed in the
inputs' dtype, as the output layer computes them, and reduced in fp32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .vocab_parallel import _all_reduce, _chunk_rows, _compute_dtype, _global_logprobs, _local_target, _reduce_chunk, _vocab_start


class _FusedLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, tp_group, vocab_size, chunk_size):
        rows, vocab_local = hidden.shape[0], weight.shape[0]
        valid = target >= 0
        vocab_start = _vocab_start(vocab_local, tp_group)
        # Rows of W past the real vocabulary (TP padding) take no part in the softmax.
        n_real = vocab_local if vocab_size is None else max(0, min(vocab_local, vocab_size - vocab_start))
        local_target, owned = _local_target(target, vocab_start, max(n_real, 1))
        owned &= valid & (n_real > 0)
        acc = _compute_dtype(hidden.dtype)
        real_weight = weight[:n_real]
        local_max = torch.full((rows,), float("-inf"), dtype=acc, device=hidden.device)
        sum_exp_and_target = torch.zeros(2, rows, dtype=acc, device=hidden.device)
        step = _chunk_rows(rows, vocab_local, chunk_size)
        for start in range(0, rows if n_real else 0, step):
            end = min(start + step, rows)
            logits = (hidden[start:end] @ real_weight.t()).to(acc)
            _reduce_chunk(logits, slice(start, end), local_target, owned, local_max, sum_exp_and_target)
            del logits
        logprobs, logsumexp = _global_logprobs(local_max, sum_exp_and_target, valid, tp_group)

        ctx.save_for_backward(hidden, weight, local_target, owned, valid, logsumexp)
        ctx.tp_group, ctx.step, ctx.n_real = tp_group, step, n_real
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, local_target, owned, valid, logsumexp = ctx.saved_tensors
        n_real = ctx.n_real
        acc = _compute_dtype(hidden.dtype)
        grad_rows = grad_output.to(acc) * valid
        rows = hidden.shape[0]
        grad_weight = torch.zeros_like(weight)
        # One of the two gradients is a sum over chunks, kept in fp32: over position chunks it is
        # dL/dW ([V/TP, h]), over vocabulary chunks dL/dx ([n, h]). The smaller one is accumulated.
        if rows <= n_real:
            grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
            step = max(1, _chunk_rows(n_real, rows, None))  # vocabulary rows per chunk: ~32 MiB of fp32
            for v0 in range(0, n_real, step):
                v1 = min(v0 + step, n_real)
                grad_logits = _grad_logits(hidden, weight[v0:v1], logsumexp, grad_rows, local_target - v0,
                                           owned & (local_target >= v0) & (local_target < v1), acc)  # fmt: skip
                grad_hidden.addmm_(grad_logits, weight[v0:v1].to(acc))
                grad_weight[v0:v1] = (grad_logits.t() @ hidden.to(acc)).to(weight.dtype)
                del grad_logits
        else:
            grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            grad_weight_acc = torch.zeros(n_real, weight.shape[1], dtype=acc, device=weight.device)
            real_weight = weight[:n_real]
            for start in range(0, rows if n_real else 0, ctx.step):
                end = min(start + ctx.step, rows)
                part = slice(start, end)
                grad_logits = _grad_logits(hidden[part], real_weight, logsumexp[part], grad_rows[part], local_target[part],
                                           owned[part], acc)  # fmt: skip
                grad_hidden[part] = (grad_logits @ real_weight.to(acc)).to(hidden.dtype)
                grad_weight_acc.addmm_(grad_logits.t(), hidden[part].to(acc))
                del grad_logits
            grad_weight[:n_real] = grad_weight_acc.to(weight.dtype)
        # Each rank's vocabulary shard contributes part of every position's input gradient.
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None


def _grad_logits(hidden, weight, logsumexp, grad_rows, local_target, owned, acc) -> torch.Tensor:
    """``dL/dz`` for ``hidden`` against the rows ``weight`` (one chunk of positions or of the
    vocabulary): ``-g softmax(z)``, plus ``g`` at each owned target (``local_target`` indexes into
    ``weight``'s rows)."""
    grad_logits = (hidden @ weight.t()).to(acc)
    grad_logits.sub_(logsumexp[:, None]).exp_().mul_(-grad_rows[:, None])
    index = local_target.clamp(0, weight.shape[0] - 1)[:, None]
    return grad_logits.scatter_add_(1, index, (grad_rows * owned)[:, None])


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``log softmax(hidden @ weight.T)[target]`` without materialising the logits.

    Args:
        hidden: ``[..., h]`` final hidden states, the same on every rank of ``tp_group`` (gather a
            sequence-parallel input first). Its gradient is summed over ``tp_group`` here.
        weight: ``[V/TP, h]`` this rank's rows of the output (or tied embedding) weight.
        target: ``[...]`` global token ids, the leading shape of ``hidden``. Negative ids (e.g.
            -100) mark ignored positions: their log-prob is 0 and they get no gradient.
        tp_group: tensor-parallel process group; ``None`` or a group of size 1: the whole vocabulary is local.
        vocab_size: the real vocabulary size when ``weight`` carries megatron's TP padding: rows with
            global id ``>= vocab_size`` are left out of the softmax and get zero gradient.
        chunk_size: positions per chunk (forward; backward when it chunks the positions); by
            default ~32 MiB of fp32 logits and at least 8 chunks.

    Returns:
        ``[...]`` fp32 (float64 for float64 inputs) log-probabilities, identical on every rank of
        ``tp_group``; equal to ``vocab_parallel_logprobs(hidden @ weight.T, target, ...)`` within rounding.
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} leading shapes differ")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V/TP, {hidden.shape[-1]}] for hidden {tuple(hidden.shape)}")
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    out = _FusedLinearLogProbs.apply(flat, weight, target.reshape(-1), tp_group, vocab_size, chunk_size)
    return out.reshape(lead)
