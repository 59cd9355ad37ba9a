"""Pool job for tests/test_fused_logprobs.py: the fused output-layer + log-prob op with the
vocabulary split over the ranks (each holds its rows of the output weight)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sampo_megatron.ops.fused_logprobs import fused_linear_logprobs


def problem(seed: int, n: int = 12, h: int = 8, vocab: int = 37, padded: int = 40):
    """float64 hidden states, a padded output weight, targets (some ignored) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(padded, h, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[::5] = -100
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, target, grad, vocab


def vocab_split(seed: int, chunk_size: int | None = None, positions: int = 12) -> dict:
    """This rank's log-probs, hidden-state gradient and weight-shard gradient (as lists: the pool's
    connection carries plain data)."""
    hidden, weight, target, grad, vocab = problem(seed, n=positions)
    size, rank = dist.get_world_size(), dist.get_rank()
    rows = weight.shape[0] // size
    x = hidden.clone().requires_grad_(True)
    shard = weight[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
    logps = fused_linear_logprobs(x, shard, target, dist.group.WORLD, vocab_size=vocab, chunk_size=chunk_size)
    logps.backward(grad)
    return {"logps": logps.detach().tolist(), "grad_hidden": x.grad.tolist(), "grad_weight": shard.grad.tolist()}


def chunk_output_width(flags: list[str]) -> dict:
    """What the policy's last chunk returns for the first micro-batch of a ``--fused-logprobs`` run:
    hidden states at the response positions (width h), not logits (width V/TP)."""
    from sampo_megatron.config import parse_config
    from sampo_megatron.plan import resolve
    from sampo_megatron.training.step import _model_logits
    from sampo_megatron.training.trainer import Trainer

    trainer = Trainer(resolve(parse_config(flags)))
    try:
        _, micro_batches = trainer.feed.micro_batches(0)
        with torch.no_grad():
            out, compact = _model_logits(trainer.ctx, micro_batches[0], trainer.model[-1])
        responses = int(micro_batches[0]["response_mask"].sum())
        return {"shape": list(out.shape), "compact": compact, "hidden": trainer.tconfig.hidden_size, "responses": responses}
    finally:
        trainer.close()
