"""What the memory planner takes: a model's shape and a parallel layout."""

from __future__ import annotations

import math
from dataclasses import dataclass


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's vocabulary padding: a multiple of ``divisible_by * tp_size`` (the embedding and
    output rows; the one statement of the rule, used by the models, the converter and the planner)."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def ffn_hidden_size(model) -> int:
    """The MLP width of ``model`` (a ``ModelConfig``): ``--ffn-hidden-size`` when given, else 4h, or
    for SwiGLU Llama's 2/3 of 4h rounded up to a multiple of 256 (its ``multiple_of``); the one
    statement of the rule (models, converter, validation and planner)."""
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if not model.swiglu:
        return 4 * model.hidden_size
    return int(256 * math.ceil(int(8 * model.hidden_size / 3) / 256))


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer, as far as memory is concerned."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    """Vocabulary before the TP padding."""
    kv_channels: int | None = None
    """Head dimension; default hidden / heads."""
    swiglu: bool = True
    normalization: str = "RMSNorm"
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    untied: bool = True
    """Separate output layer (else the embedding is reused; a copy sits on the last stage when PP > 1)."""
    make_vocab_size_divisible_by: int = 128

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Layout:
    """How a run is laid out over GPUs, and what each GPU holds."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; 1 without interleaving."""
    dp: int = 1
    """Data-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    micro_batch_size: int = 1
    """Pairs per micro-batch (2 sequences each: chosen and rejected)."""
    global_batch_size: int = 1
    """Pairs per optimizer step."""
    seq_length: int = 2048
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute_granularity: str | None = None
    """None, full or selective."""
    recompute_method: str | None = None
    """uniform or block (full recomputation)."""
    recompute_num_layers: int | None = None
    fp8: str | None = None
    """None, e4m3 or hybrid."""
    bf16_layers: int = 0
    """Layers kept in BF16 under FP8 (first + last)."""
    param_bytes: int = 2
    """Bytes per parameter and activation element: 2 (bf16/fp16) or 4 (fp32)."""
    ref_mode: str = "replica"
    """replica (a frozen copy of the policy on the same GPUs) or cache (reference log-probs on disk)."""
    token_kl: bool = False
    """TDPO (``--loss-type tdpo1/tdpo2``): the replica keeps its final hidden states at the response
    positions of the step's micro-batches, and the loss recomputes one micro-batch's reference logits."""
    fused_logprobs: bool = False
    """``--fused-logprobs``: the response log-probs come from the hidden states and the output weight
    chunk by chunk (no ``[T, V/TP]`` logits, ops/fused_logprobs.py)."""
    attention: str = "flash"
    """flash (Transformer Engine, or the local spec's SDPA attention: no seq x seq tensor kept) or
    local (megatron-core's unfused DotProductAttention: the softmax output is kept)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def num_micro_batches(self) -> int:
        return max(1, self.global_batch_size // (self.micro_batch_size * self.dp))

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"] + ([f"VPP{self.vpp}"] if self.vpp > 1 else [])
        parts += [f"DP{self.dp}"] + ([f"CP{self.cp}"] if self.cp > 1 else []) + [f"mbs{self.micro_batch_size}"]
        parts += ["SP"] if self.sequence_parallel else []
        parts += ["dist-opt"] if self.distributed_optimizer else []
        if self.recompute_granularity:
            parts.append(
                f"recompute-{self.recompute_granularity}"
                + (f"-{self.recompute_method}{self.recompute_num_layers}" if self.recompute_method else "")
            )
        parts += [f"fp8-{self.fp8}"] if self.fp8 else []
        parts.append(f"ref-{self.ref_mode}")
        parts += ["token-kl"] if self.token_kl else []
        parts += ["fused-logprobs"] if self.fused_logprobs else []
        return " ".join(parts)


TOKEN_KL_LOSSES = ("tdpo1", "tdpo2")
"""The ``--loss-type`` values that need the per-token KL (tests check the loss registry agrees)."""


def attention_kind(transformer_impl: str, local_attention: str) -> str:
    """:attr:`Layout.attention` of a run: ``local`` only for megatron-core's unfused attention."""
    return "local" if transformer_impl == "local" and local_attention == "megatron" else "flash"
