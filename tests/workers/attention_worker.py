"""SDPACoreAttention against megatron-core's DotProductAttention, at any TP (fp32, CPU/gloo).

Launched by ``tests/test_attention.py`` through torchrun. Builds the same tiny GPTModel twice (same
seed, so the same weights) with ``--local-attention sdpa`` and ``megatron``, runs a forward and a
backward on the same tokens, and writes to ``--out`` (rank 0):

* ``logits_rel`` / ``grad_rel``: the largest relative difference of the logits and of any
  parameter gradient (this rank's shard) between the two;
* ``packed_rel``: THD-packed sequences (``PackedSeqParams``, RoPE restarting per sequence) against
  each sequence alone, logits at every real position;
* ``perturbed_equal``: after changing the tokens of one packed sequence, the logits of every other
  sequence of the row are bitwise unchanged.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from sampo_megatron.config import ModelConfig, ParallelConfig, TrainingConfig
from sampo_megatron.models.gpt import build_model_chunks, transformer_config
from sampo_megatron.runtime.distributed import close_distributed, init_distributed, init_model_parallel

VOCAB = 128
LENGTHS = (5, 9, 3)  # packed sequences of one row
PACK_WIDTH = 24  # > sum(LENGTHS): the row ends with padding


def build(local_attention: str, tp: int, sp: bool):
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, local_attention=local_attention)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    training = TrainingConfig(seq_length=32)
    torch.manual_seed(7)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    config = transformer_config(model, parallel)
    (chunk,) = build_model_chunks(model, config, VOCAB, training.seq_length)
    return chunk


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def gathered(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def packed_params(lengths, width: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # Trailing padding is one more sequence of its own (megatron-core's THD rows cover every token).
    cu_padded = torch.cat([cu, torch.tensor([width], dtype=torch.int32)]) if cu[-1] < width else cu
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_padded, cu_seqlens_kv=cu_padded,
                           max_seqlen_q=int(max(lengths)), max_seqlen_kv=int(max(lengths)))  # fmt: skip


def packed_logits(model, sequences: list[torch.Tensor]) -> torch.Tensor:
    row = torch.zeros(PACK_WIDTH, dtype=torch.long)
    positions = torch.zeros(PACK_WIDTH, dtype=torch.long)
    at = 0
    for seq in sequences:
        row[at : at + len(seq)] = seq
        positions[at : at + len(seq)] = torch.arange(len(seq))
        at += len(seq)
    params = packed_params([len(s) for s in sequences], PACK_WIDTH)
    return gathered(model(row[None], positions[None], None, packed_seq_params=params))[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    init_model_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, sequence_parallel=args.sp), seed=7)

    tokens = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32)[None].expand(3, -1)
    result: dict[str, float | bool] = {}
    outputs = {}
    for kind in ("sdpa", "megatron"):
        model = build(kind, args.tp, args.sp)
        logits = model(tokens, positions, None)
        (logits.float().pow(2).mean() * 1e3).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outputs[kind] = (gathered(logits.detach()), grads)
    (ls, gs), (lm, gm) = outputs["sdpa"], outputs["megatron"]
    assert gs.keys() == gm.keys() and gs, "the two models have different parameters"
    result["logits_rel"] = rel(ls, lm)
    result["grad_rel"] = max(rel(gs[name], gm[name]) for name in gm)

    model = build("sdpa", args.tp, args.sp)
    model.eval()
    with torch.no_grad():
        sequences = [tokens[i, :n] for i, n in enumerate(LENGTHS)]
        packed = packed_logits(model, sequences)
        at, worst = 0, 0.0
        for seq in sequences:
            # right padding to an even width (sequence parallelism splits it over TP); causal
            # attention keeps it out of the real positions
            padded = torch.nn.functional.pad(seq, (0, len(seq) % 2))
            alone = gathered(model(padded[None], torch.arange(len(padded))[None], None))[0, : len(seq)]
            worst = max(worst, rel(packed[at : at + len(seq)], alone))
            at += len(seq)
        result["packed_rel"] = worst
        changed = [s.clone() for s in sequences]
        changed[1] = (changed[1] + 1) % VOCAB
        again = packed_logits(model, changed)
        first, third = slice(0, LENGTHS[0]), slice(LENGTHS[0] + LENGTHS[1], sum(LENGTHS))
        result["perturbed_equal"] = bool(torch.equal(again[first], packed[first]) and torch.equal(again[third], packed[third]))
        result["perturbed_changed"] = not torch.equal(again[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]], packed[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    close_distributed()


if __name__ == "__main__":
    main()
