"""Per-GPU memory of a SamPO / DPO run, by part, from the model's shape and the layout.

The parts (bytes on the busiest pipeline stage):

- **weights**: the stage's parameters (``P``) at ``param_bytes`` each, plus, under FP8, an FP8 copy of
  each GEMM weight of the FP8 layers in both orientations (2 bytes per weight, Transformer Engine).
- **gradients**: ``4 P`` (the trainer accumulates and reduces gradients in fp32).
- **optimizer**: Adam's two moments in fp32 (``8 P``) plus fp32 master weights (``4 P``) for 16-bit
  models, divided by ``DP x CP`` with the distributed optimizer.
- **reference**: the replica's weights (``--ref-mode replica``), or nothing (``cache``).
- **activations**: what backward needs, per layer and micro-batch of ``T = 2 mbs s / CP`` tokens
  (chosen and rejected rows), times the layers in flight (see :func:`layer_activation_bytes`),
  plus what a recomputation in backward holds beyond the logits (freed by then).
- **logits**: the ``[T, V/TP]`` logits the log-prob op keeps (its backward writes the gradient into
  them) plus its fp32 working chunk, and the inputs of the final norm and output layer.

TDPO (``layout.token_kl``, :func:`token_kl_bytes`) adds on the last stage: to **reference**, the
replica's final hidden states ``[T, h]`` kept for every micro-batch of the step; to **logits**, one
micro-batch's reference logits, and a gradient of the logits (the log-prob op can no longer write
its gradient in place).

Nothing here needs torch: the planner runs anywhere, GPU or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .presets import padded_vocab
from .shapes import Layout, ModelShape

GIB = 2**30
PARTS = ("weights", "gradients", "optimizer", "reference", "activations", "logits")
_LOGPROB_CHUNK_BYTES = 32 * 2**20  # ops/vocab_parallel.py's fp32 working set per chunk


def layer_params(shape: ModelShape, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank.

    ``h (a + 2g) d / t`` (QKV) + ``a d h / t`` (attention output) + ``h f_1 / t`` (fc1, ``f_1 = 2f``
    with SwiGLU) + ``f h / t`` (fc2) + the norms (``2h``, twice with LayerNorm's bias) + biases
    (column-parallel ones split over TP, row-parallel ones replicated).
    """
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    qkv_out = (shape.num_attention_heads + 2 * shape.num_query_groups) * d
    fc1_out = f * (2 if shape.swiglu else 1)
    params = gemm_params(shape, tp) + 2 * h * (2 if shape.normalization == "LayerNorm" else 1)
    if shape.add_qkv_bias or shape.add_bias_linear:
        params += qkv_out // tp
    if shape.add_bias_linear:
        params += fc1_out // tp + 2 * h
    return params


def gemm_params(shape: ModelShape, tp: int) -> int:
    """Weights of one layer's four GEMMs on one TP rank (what FP8 casts)."""
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    a, g = shape.num_attention_heads, shape.num_query_groups
    fc1_out = f * (2 if shape.swiglu else 1)
    return (h * (a + 2 * g) * d + a * d * h + h * fc1_out + f * h) // tp


def stage_params(shape: ModelShape, layout: Layout, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage ``stage``: its layers, the embedding on the first
    stage, the final norm and output layer on the last (a tied embedding's copy when PP > 1)."""
    h, vocab = shape.hidden_size, padded_vocab(shape, layout.tp)
    params = shape.num_layers // layout.pp * layer_params(shape, layout.tp)
    if stage == 0:
        params += vocab * h // layout.tp
    if stage == layout.pp - 1:
        params += h * (2 if shape.normalization == "LayerNorm" else 1)
        if shape.untied or layout.pp > 1:
            params += vocab * h // layout.tp
    return params


def layer_activation_bytes(shape: ModelShape, layout: Layout, fp8: bool) -> tuple[int, int]:
    """``(kept, scores)``: bytes one layer keeps for backward for one micro-batch, and the part of
    them that is the attention softmax output (absent with flash attention).

    With ``T`` tokens, ``e`` bytes per element (``e_g`` for GEMM inputs: 1 under FP8), TP ``t``:

    - norm inputs and the inputs of QKV and fc1: ``T h (2e + 2e_g)``, divided by ``t`` with
      sequence parallelism;
    - attention, local: query and the key/value expanded to all heads, and the output-projection
      input, ``4 T a d e / t``; flash: query, key, value and output, ``(2a + 2g) T d e / t``;
    - softmax output (local): ``2 mbs (a / t) (s / CP) s e``;
    - MLP: fc1 output ``T f_1 e / t``, with SwiGLU the SiLU output ``T f e / t``, and the fc2 input
      ``T f e_g / t``.
    """
    e = layout.param_bytes
    e_gemm = 1 if fp8 else e
    t = layout.tp
    tokens = 2 * layout.micro_batch_size * layout.seq_length // layout.cp
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    a, g = shape.num_attention_heads, shape.num_query_groups
    hidden = tokens * h * (2 * e + 2 * e_gemm) // (t if layout.sequence_parallel else 1)
    if layout.attention == "local":
        attention = 3 * tokens * a * d * e // t + tokens * a * d * e_gemm // t
        scores = 2 * layout.micro_batch_size * (a // t) * (layout.seq_length // layout.cp) * layout.seq_length * e
    else:
        attention = (2 * a + 2 * g) * tokens * d * e // t
        scores = 0
    mlp = (tokens * f * (3 if shape.swiglu else 1) * e + tokens * f * e_gemm) // t
    return hidden + attention + mlp + scores, scores


def chunks_in_flight(layout: Layout, stage: int) -> int:
    """Micro-batch x model-chunk forwards whose activations a stage holds at once under megatron's
    1F1B schedule: ``PP - stage`` (no interleaving), ``2 (PP - stage - 1) + (VPP - 1) PP + 1``
    (interleaved), at most all of them."""
    total = layout.num_micro_batches * layout.vpp
    if layout.vpp == 1:
        return min(layout.pp - stage, total)
    return min(2 * (layout.pp - stage - 1) + (layout.vpp - 1) * layout.pp + 1, total)


def stage_activation_bytes(shape: ModelShape, layout: Layout, stage: int) -> tuple[int, int]:
    """``(kept, working)``: activations a stage keeps at its peak, for each chunk in flight (all of
    them, or with full recomputation only the inputs of the recomputed layers), and the working set
    of one recomputation in backward (``N`` layers, uniform; one layer, block; the softmax output,
    selective)."""
    chunk_layers = shape.num_layers // (layout.pp * layout.vpp)
    fp8_layers = chunk_layers if layout.fp8 else 0
    if layout.fp8 and layout.bf16_layers:
        fp8_layers = max(0, chunk_layers - layout.bf16_layers // layout.pp)
    per_layer_fp8, scores_fp8 = layer_activation_bytes(shape, layout, fp8=True)
    per_layer_bf16, scores_bf16 = layer_activation_bytes(shape, layout, fp8=False)
    per_layer = (fp8_layers * per_layer_fp8 + (chunk_layers - fp8_layers) * per_layer_bf16) / max(chunk_layers, 1)
    scores = scores_fp8 if fp8_layers else scores_bf16
    tokens = 2 * layout.micro_batch_size * layout.seq_length // layout.cp
    layer_input = tokens * shape.hidden_size * layout.param_bytes // (layout.tp if layout.sequence_parallel else 1)

    granularity, n = layout.recompute_granularity, layout.recompute_num_layers or 0
    if granularity == "selective":
        kept, working = chunk_layers * (per_layer - scores), scores
    elif granularity == "full" and layout.recompute_method == "uniform":
        kept, working = math.ceil(chunk_layers / n) * layer_input, n * per_layer
    elif granularity == "full" and layout.recompute_method == "block":
        recomputed = min(n, chunk_layers)
        kept, working = recomputed * layer_input + (chunk_layers - recomputed) * per_layer, per_layer if recomputed else 0
    else:
        kept, working = chunk_layers * per_layer, 0
    return int(chunks_in_flight(layout, stage) * kept), int(working)


def logits_bytes(shape: ModelShape, layout: Layout) -> int:
    """The last stage's ``[T, V/TP]`` logits, the log-prob op's fp32 chunk, and the final norm's and
    output layer's inputs, for one micro-batch (its backward runs right after its forward).

    With ``--fused-logprobs`` no logits exist: two fp32 chunks of logits (forward, then the
    backward's recomputed one) and the backward's fp32 sum over chunks, of the smaller of the hidden
    states' ``[T, h]`` and the output weight's ``[V/TP, h]`` gradients (ops/fused_logprobs.py)."""
    tokens = 2 * layout.micro_batch_size * layout.seq_length // layout.cp
    vocab_local = padded_vocab(shape, layout.tp) // layout.tp
    chunk_rows = max(1, min(_LOGPROB_CHUNK_BYTES // (4 * vocab_local), -(-tokens // 8)))
    hidden = 2 * tokens * shape.hidden_size * layout.param_bytes // (layout.tp if layout.sequence_parallel else 1)
    if layout.fused_logprobs:
        return 2 * chunk_rows * vocab_local * 4 + min(tokens, vocab_local) * shape.hidden_size * 4 + hidden
    return tokens * vocab_local * layout.param_bytes + chunk_rows * vocab_local * 4 + hidden


def token_kl_bytes(shape: ModelShape, layout: Layout) -> tuple[int, int]:
    """TDPO's extra bytes on the last stage: ``(kept, per micro-batch)``.

    ``kept``: the reference's final hidden states ``[T, h]`` (whole over sequence parallelism) of every
    micro-batch of the step, held from the reference's forward to each micro-batch's loss.
    ``per micro-batch``: the recomputed ``[T, V/TP]`` reference logits (the KL keeps them for its
    backward), the ``[T, V/TP]`` gradient of the policy's logits (the log-prob op cannot write it
    into the logits, which the KL's backward reads), and the KL's fp32 chunk.
    ``T`` counts every position, an upper bound of the response positions.
    """
    if not layout.token_kl:
        return 0, 0
    tokens = 2 * layout.micro_batch_size * layout.seq_length // layout.cp
    vocab_local = padded_vocab(shape, layout.tp) // layout.tp
    chunk_rows = max(1, min(_LOGPROB_CHUNK_BYTES // (4 * vocab_local), -(-tokens // 8)))
    kept = layout.num_micro_batches * tokens * shape.hidden_size * layout.param_bytes
    return kept, 2 * tokens * vocab_local * layout.param_bytes + 2 * chunk_rows * vocab_local * 4


@dataclass
class MemoryPlan:
    """Bytes per part on the busiest GPU, and which pipeline stage that is."""

    layout: Layout
    parts: dict[str, int] = field(default_factory=dict)
    stage: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, gpu_bytes: float, reserve: float = 0.9) -> bool:
        """Whether the plan fits ``reserve`` of the GPU (the rest: CUDA context, NCCL, fragmentation)."""
        return self.total <= reserve * gpu_bytes


def stage_plan(shape: ModelShape, layout: Layout, stage: int) -> MemoryPlan:
    """The memory of one GPU of pipeline stage ``stage``."""
    params = stage_params(shape, layout, stage)
    layers = shape.num_layers // layout.pp
    fp8_layers = 0
    if layout.fp8:
        fp8_layers = max(0, layers - layout.bf16_layers // layout.pp) if layout.bf16_layers else layers
    weights = params * layout.param_bytes + 2 * fp8_layers * gemm_params(shape, layout.tp)
    master = 4 if layout.param_bytes < 4 else 0
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    parts = {
        "weights": weights,
        "gradients": 4 * params,
        "optimizer": (8 + master) * params // shards,
        "reference": weights if layout.ref_mode == "replica" else 0,
        "logits": logits_bytes(shape, layout) if stage == layout.pp - 1 else 0,
    }
    if stage == layout.pp - 1:
        kept_hidden, kl_logits = token_kl_bytes(shape, layout)
        parts["reference"] += kept_hidden
        parts["logits"] += kl_logits
    kept, working = stage_activation_bytes(shape, layout, stage)
    # The last stage's logits are freed (log-prob op and output layer backward) before the first
    # recomputation in backward starts: the two working sets do not add up.
    parts["activations"] = kept + max(0, working - parts["logits"])
    return MemoryPlan(layout, parts, stage)


def plan_memory(shape: ModelShape, layout: Layout) -> MemoryPlan:
    """The per-GPU memory plan of the busiest stage (first, last or a middle one)."""
    stages = sorted({0, layout.pp - 1} | ({1} if layout.pp > 2 else set()))
    return max((stage_plan(shape, layout, s) for s in stages), key=lambda p: p.total)


def format_plan(plan: MemoryPlan, gpu_gib: float | None = None) -> str:
    """A table of the parts in GiB, the total, and whether it fits a ``gpu_gib`` GPU."""
    lines = [f"memory plan per GPU ({plan.layout.describe()}; {plan.layout.world_size} GPUs, pipeline stage {plan.stage}):"]
    for name in PARTS:
        lines.append(f"  {name:<12} {plan.parts[name] / GIB:9.2f} GiB")
    lines.append(f"  {'total':<12} {plan.total / GIB:9.2f} GiB")
    if gpu_gib is not None:
        verdict = "fits" if plan.fits(gpu_gib * GIB) else "does NOT fit"
        lines.append(f"  {verdict} a {gpu_gib:g} GiB GPU (90% usable: {0.9 * gpu_gib:.1f} GiB)")
    return "\n".join(lines)
