"""Compact logits (output layer only at response positions) against full logits, on a tiny
megatron-core GPTModel at TP=2 with and without sequence parallelism (torchrun, gloo, CPU).

For each variant, the same weights (layout-independent initialisation) and a micro-batch with
prompts, responses of different lengths and right padding go through the model twice: once with
full ``[b, s, V/TP]`` logits, once with :func:`select_output_positions` (``[1, n, V/TP]``). Rank 0
writes, per variant, the largest relative difference of the per-token log-probs under the response
mask and of every parameter's gradient (each rank's own, all-reduced MAX), and the logits' shapes.

Usage: torchrun --nproc-per-node 2 response_logits_worker.py --out RESULT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from sampo_megatron.compat import apply_cpu_compat, model_parallel_manual_seed
from sampo_megatron.config import ModelConfig, ParallelConfig
from sampo_megatron.models.gpt import build_model_chunks, transformer_config
from sampo_megatron.models.response_logits import install_output_selection
from sampo_megatron.models.weights import initialize_deterministically
from sampo_megatron.runtime.distributed import close_distributed, init_distributed, reset_megatron_state
from sampo_megatron.training.step import StepContext, _model_logits, token_logprobs

VOCAB, SEQ, SEED = 200, 32, 7


def micro_batch() -> dict:
    gen = torch.Generator().manual_seed(SEED)
    rows = 4
    tokens = torch.randint(3, VOCAB, (rows, SEQ), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(rows, SEQ, dtype=torch.bool)
    for row, (prompt, length) in enumerate([(5, 20), (9, 12), (3, 28), (7, 7)]):
        mask[row, prompt - 1 : prompt - 1 + length] = True
        tokens[row, prompt + length :] = 0  # right padding
    return {"tokens": tokens, "labels": labels, "response_mask": mask, "position_ids": torch.arange(SEQ).expand(rows, -1)}


def run(sequence_parallel: bool, compact: bool, tp_group) -> tuple[torch.Tensor, dict, tuple]:
    model_cfg = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, make_vocab_size_divisible_by=8
    )
    config = transformer_config(model_cfg, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel))
    (chunk,) = build_model_chunks(model_cfg, config, VOCAB, SEQ)
    initialize_deterministically([chunk], seed=SEED, vocab_size=VOCAB)
    install_output_selection(chunk)
    ctx = StepContext(loss=None, tp_group=tp_group, vocab_size=VOCAB, response_logits_only=compact)
    batch = micro_batch()
    logits, compact_logits = _model_logits(ctx, batch, chunk)
    logps = token_logprobs(batch, logits, ctx, compact=compact_logits, inplace_backward=True)
    weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)  # an uneven upstream gradient
    (logps * weights * batch["response_mask"]).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in chunk.named_parameters() if p.grad is not None}
    return logps.detach(), grads, tuple(logits.shape)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1]
    init_distributed()
    apply_cpu_compat()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_manual_seed(SEED)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    result = {}
    for sp in (False, True):
        full_logps, full_grads, full_shape = run(sp, False, tp_group)
        compact_logps, compact_grads, compact_shape = run(sp, True, tp_group)
        mask = micro_batch()["response_mask"]
        diffs = torch.tensor(
            [max_rel(compact_logps[mask], full_logps[mask]), (compact_logps[~mask] != 0).sum().item()]
            + [max_rel(compact_grads[n], g) for n, g in full_grads.items()]
            + [float(set(full_grads) != set(compact_grads))],
            dtype=torch.float64,
        )
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        result["sequence_parallel" if sp else "tensor_parallel"] = {
            "logps_max_rel": diffs[0].item(),
            "nonzero_outside_mask": diffs[1].item(),
            "grads_max_rel": diffs[2:-1].max().item(),
            "grad_names_differ": diffs[-1].item(),
            "num_grads": len(full_grads),
            "full_shape": full_shape,
            "compact_shape": compact_shape,
            "response_tokens": int(mask.sum()),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    reset_megatron_state()
    close_distributed()


if __name__ == "__main__":
    main()
