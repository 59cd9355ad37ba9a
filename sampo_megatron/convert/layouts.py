"""Which Hugging Face tensors make which megatron-core checkpoint tensor, and how.

megatron-core's torch_dist checkpoint holds every tensor at its full (TP=1, PP=1) shape, whatever
the layout it was written from; decoder layers are stacked on a leading axis (``[L, ...]`` under
``decoder.layers.*``, layer ``i`` at offset ``i``). Its layouts (megatron-core 0.16.1, local and
Transformer Engine specs alike):

* ``linear_qkv``: per query group ``g``, the ``heads/groups`` query heads of the group, then its
  key head, then its value head (``[q_g; k_g; v_g]`` for ``g = 0..groups-1``). GPT-NeoX's
  ``query_key_value`` is exactly this layout for its multi-head attention (per head ``[q; k; v]``).
* ``linear_fc1`` of a gated MLP: ``[gate; up]`` (megatron-core's SwiGLU sharded factory).
* norms are saved under the linear layer that follows them:
  ``self_attention.linear_qkv.layer_norm_{weight,bias}`` (input norm) and
  ``mlp.linear_fc1.layer_norm_{weight,bias}`` (pre-MLP norm).
* embedding and output layer rows are padded to a multiple of ``make_vocab_size_divisible_by x TP``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.gpt import ffn_hidden_size

LAYER_PREFIX = "decoder.layers."
# Linear layers whose ``_extra_state`` (a ShardedObject per layer) the model's sharded state holds.
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


@dataclass(frozen=True)
class Rule:
    """One megatron checkpoint tensor and the Hugging Face tensors it is made of."""

    megatron: str
    """Checkpoint key; a ``decoder.layers.`` key is stacked over layers."""
    hf: tuple[str, ...]
    """Hugging Face names (``{i}``: the layer index), in the order the kind expects."""
    shapes: tuple[tuple[int, ...], ...]
    """The shape of each Hugging Face tensor."""
    kind: str = "copy"
    """copy (same tensor), qkv (fused attention projection), glu ([gate; up]), vocab (padded rows)."""

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]

    def megatron_shape(self, model: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
        """Shape of one layer's (or the global) megatron tensor."""
        first = self.shapes[0]
        if self.kind == "vocab":
            return (padded_vocab, *first[1:])
        if self.kind in ("qkv", "glu"):
            return (sum(s[0] for s in self.shapes), *first[1:])
        return first


def _dims(model: ModelConfig) -> tuple[int, int, int, int, int]:
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.kv_channels or model.hidden_size // heads
    return model.hidden_size, heads, groups, head_dim, ffn_hidden_size(model)


def _llama_rules(model: ModelConfig) -> list[Rule]:
    h, heads, groups, d, f = _dims(model)
    v = model.vocab_size
    p = "model.layers.{i}."
    qkv_shapes = ((heads * d, h), (groups * d, h), (groups * d, h))
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((v, h),), "vocab"),
        Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (p + "input_layernorm.weight",), ((h,),)),
        Rule(
            "decoder.layers.self_attention.linear_qkv.weight",
            tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
            qkv_shapes,
            "qkv",
        ),
    ]
    if model.add_qkv_bias:
        rules.append(
            Rule(
                "decoder.layers.self_attention.linear_qkv.bias",
                tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"),
                tuple(s[:1] for s in qkv_shapes),
                "qkv",
            )
        )
    rules += [
        Rule("decoder.layers.self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), ((h, heads * d),)),
        Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (p + "post_attention_layernorm.weight",), ((h,),)),
        Rule(
            "decoder.layers.mlp.linear_fc1.weight",
            (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            ((f, h), (f, h)),
            "glu",
        ),
        Rule("decoder.layers.mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), ((h, f),)),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)),
    ]
    if model.untie_embeddings_and_output_weights:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), ((v, h),), "vocab"))
    return rules


def _neox_rules(model: ModelConfig) -> list[Rule]:
    h, heads, _, d, f = _dims(model)
    v = model.vocab_size
    p = "gpt_neox.layers.{i}."
    qkv = "decoder.layers.self_attention.linear_qkv."
    fc1 = "decoder.layers.mlp.linear_fc1."
    pairs = [
        (qkv + "layer_norm_weight", p + "input_layernorm.weight", (h,)),
        (qkv + "layer_norm_bias", p + "input_layernorm.bias", (h,)),
        (qkv + "weight", p + "attention.query_key_value.weight", (3 * heads * d, h)),
        (qkv + "bias", p + "attention.query_key_value.bias", (3 * heads * d,)),
        ("decoder.layers.self_attention.linear_proj.weight", p + "attention.dense.weight", (h, heads * d)),
        ("decoder.layers.self_attention.linear_proj.bias", p + "attention.dense.bias", (h,)),
        (fc1 + "layer_norm_weight", p + "post_attention_layernorm.weight", (h,)),
        (fc1 + "layer_norm_bias", p + "post_attention_layernorm.bias", (h,)),
        (fc1 + "weight", p + "mlp.dense_h_to_4h.weight", (f, h)),
        (fc1 + "bias", p + "mlp.dense_h_to_4h.bias", (f,)),
        ("decoder.layers.mlp.linear_fc2.weight", p + "mlp.dense_4h_to_h.weight", (h, f)),
        ("decoder.layers.mlp.linear_fc2.bias", p + "mlp.dense_4h_to_h.bias", (h,)),
        ("decoder.final_layernorm.weight", "gpt_neox.final_layer_norm.weight", (h,)),
        ("decoder.final_layernorm.bias", "gpt_neox.final_layer_norm.bias", (h,)),
    ]
    rules = [Rule("embedding.word_embeddings.weight", ("gpt_neox.embed_in.weight",), ((v, h),), "vocab")]
    rules += [Rule(key, (name,), (shape,)) for key, name, shape in pairs]
    if model.untie_embeddings_and_output_weights:
        rules.append(Rule("output_layer.weight", ("embed_out.weight",), ((v, h),), "vocab"))
    return rules


def rules_for(layout: str, model: ModelConfig) -> list[Rule]:
    """The rules of a weight layout (``Family.layout``) for ``model``."""
    if layout == "llama":
        return _llama_rules(model)
    if layout == "gpt_neox":
        return _neox_rules(model)
    raise ValueError(f"unknown weight layout {layout!r}")


# Tensors a Hugging Face checkpoint may hold that are buffers, not weights (old GPT-NeoX files).
IGNORED_HF_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Hugging Face q/k/v projections (weights or biases) -> megatron's per-group fused layout."""
    _, heads, groups, d, _ = _dims(model)
    rest = q.shape[1:]
    parts = (q.reshape(groups, heads // groups * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    _, heads, groups, d, _ = _dims(model)
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (heads // groups + 2) * d, *rest).split([heads // groups * d, d, d], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def to_hf(rule: Rule, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """One layer's (or the global) megatron tensor -> the Hugging Face tensors of ``rule``."""
    if rule.kind == "qkv":
        return split_qkv(tensor, model)
    if rule.kind == "glu":
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    if rule.kind == "vocab":
        return [tensor[: model.vocab_size].contiguous()]
    return [tensor]
