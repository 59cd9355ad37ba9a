"""Hugging Face config.json <-> ModelConfig for the supported families.

Supported: ``LlamaForCausalLM`` (Llama 2 and 3, Llama 3.1 RoPE scaling), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (Qwen2 and Qwen1.5: QKV bias, tied or untied embeddings) and
``GPTNeoXForCausalLM`` (Pythia: LayerNorm with bias, GELU, biases everywhere, partial rotary,
parallel residual). Configs are parsed with ``transformers``' own config classes, so legacy keys
(``rope_scaling``, ``rope_theta``, ``rotary_pct``, ...) and the library's defaults for absent keys
are read exactly as ``from_pretrained`` reads them. Whatever megatron-core cannot compute the same
way is refused with a :class:`ConversionError`, never approximated.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.architecture import model_architecture
from ..models.gpt import ffn_hidden_size
from .errors import ConversionError

# megatron-core's Llama 3.1 RoPE scaling has these fixed (rotary_pos_embedding.py _apply_scaling).
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_GELU_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Keys of a config.json that describe RoPE, in the current and the legacy layouts.
_ROPE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_pct", "rotary_emb_base", "partial_rotary_factor")


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture."""

    architecture: str
    """``config.json``'s ``architectures[0]``, e.g. ``LlamaForCausalLM``."""
    model_type: str
    layout: str
    """Weight layout (:mod:`.layouts`): ``llama`` or ``gpt_neox``."""
    to_model: Callable[[object], ModelConfig]
    """transformers config object -> ModelConfig."""
    to_hf: Callable[[ModelConfig], dict]
    """ModelConfig -> the architecture keys of a config.json."""


def _unsupported(arch: str, what: str) -> ConversionError:
    return ConversionError(f"{arch}: {what} is not supported (megatron-core cannot compute it the same way)")


def _rope(config, arch: str, allow_partial: bool) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", 10000.0))
    if not theta.is_integer():
        raise _unsupported(arch, f"a non-integer rope_theta ({theta})")
    partial = float(params.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and not allow_partial:
        raise _unsupported(arch, f"partial_rotary_factor {partial}")
    rope = {"rotary_base": int(theta), "rotary_percent": partial, "rope_scaling": False, "rope_scaling_factor": 8.0}
    kind = params.get("rope_type", "default")
    if kind == "llama3":
        for key, value in _MEGATRON_LLAMA3_ROPE.items():
            if float(params.get(key, value)) != value:
                raise _unsupported(arch, f"Llama 3 RoPE scaling with {key}={params.get(key)} (megatron-core fixes it at {value})")
        rope.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif kind != "default":
        raise _unsupported(arch, f"RoPE type {kind!r}")
    return rope


def _rope_parameters(model: ModelConfig, neox: bool) -> dict:
    params: dict = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if neox or model.rotary_percent != 1.0:
        params["partial_rotary_factor"] = model.rotary_percent
    if model.rope_scaling:
        params.update(rope_type="llama3", factor=model.rope_scaling_factor, **_MEGATRON_LLAMA3_ROPE)
    return params


def _llama_like_model(config, arch: str, qkv_bias: bool, sliding_window: int | None) -> ModelConfig:
    heads = config.num_attention_heads
    if config.hidden_act != "silu":
        raise _unsupported(arch, f"hidden_act {config.hidden_act!r} (SwiGLU with silu expected)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return dataclasses.replace(
        ModelConfig(),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        norm_epsilon=float(config.rms_norm_eps),
        swiglu=True,
        add_qkv_bias=qkv_bias,
        add_bias_linear=False,
        parallel_residual=False,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        vocab_size=config.vocab_size,
        sliding_window=sliding_window,
        **_rope(config, arch, allow_partial=False),
    )


def _llama_model(config) -> ModelConfig:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise _unsupported("LlamaForCausalLM", "attention_bias / mlp_bias")
    return _llama_like_model(config, "LlamaForCausalLM", qkv_bias=False, sliding_window=None)


def _mistral_model(config) -> ModelConfig:
    return _llama_like_model(config, "MistralForCausalLM", qkv_bias=False, sliding_window=getattr(config, "sliding_window", None))


def _qwen2_model(config) -> ModelConfig:
    if getattr(config, "use_sliding_window", False):
        raise _unsupported("Qwen2ForCausalLM", "use_sliding_window (per-layer sliding-window attention)")
    return _llama_like_model(config, "Qwen2ForCausalLM", qkv_bias=True, sliding_window=None)


def _neox_model(config) -> ModelConfig:
    arch = "GPTNeoXForCausalLM"
    activation = _GELU_ACTS.get(config.hidden_act)
    if activation is None:
        raise _unsupported(arch, f"hidden_act {config.hidden_act!r}")
    if not getattr(config, "attention_bias", True):
        raise _unsupported(arch, "attention_bias=false (megatron-core's add_bias_linear covers attention and MLP together)")
    return dataclasses.replace(
        ModelConfig(),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_attention_heads,
        kv_channels=config.hidden_size // config.num_attention_heads,
        normalization="LayerNorm",
        norm_epsilon=float(config.layer_norm_eps),
        swiglu=False,
        activation=activation,
        add_qkv_bias=False,
        add_bias_linear=True,
        parallel_residual=bool(config.use_parallel_residual),
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        vocab_size=config.vocab_size,
        sliding_window=None,
        **_rope(config, arch, allow_partial=True),
    )


def _llama_like_hf(model: ModelConfig) -> dict:
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": ffn_hidden_size(model),
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.kv_channels or model.hidden_size // model.num_attention_heads,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "rope_parameters": _rope_parameters(model, neox=False),
    }


def _llama_hf(model: ModelConfig) -> dict:
    return {**_llama_like_hf(model), "attention_bias": False, "mlp_bias": False}


def _mistral_hf(model: ModelConfig) -> dict:
    return {**_llama_like_hf(model), "sliding_window": model.sliding_window}


def _qwen2_hf(model: ModelConfig) -> dict:
    return {**_llama_like_hf(model), "use_sliding_window": False}


def _neox_hf(model: ModelConfig) -> dict:
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": ffn_hidden_size(model),
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "hidden_act": "gelu" if model.activation == "gelu" else "gelu_pytorch_tanh",
        "layer_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "use_parallel_residual": model.parallel_residual,
        "attention_bias": True,
        "rope_parameters": _rope_parameters(model, neox=True),
    }


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", "llama", _llama_model, _llama_hf),
        Family("MistralForCausalLM", "mistral", "llama", _mistral_model, _mistral_hf),
        Family("Qwen2ForCausalLM", "qwen2", "llama", _qwen2_model, _qwen2_hf),
        Family("GPTNeoXForCausalLM", "gpt_neox", "gpt_neox", _neox_model, _neox_hf),
    )
}


def family_of(raw: dict, source: str = "config.json") -> Family:
    """The family of a raw ``config.json`` dict.

    Raises:
        ConversionError: the architecture is missing or not supported.
    """
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ConversionError(f"{source}: no 'architectures' entry; supported: {', '.join(FAMILIES)}")
    if len(architectures) > 1 or architectures[0] not in FAMILIES:
        raise ConversionError(f"{source}: unsupported architecture {architectures}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[architectures[0]]


def hf_config_object(raw: dict, family: Family):
    """The transformers config object for a raw ``config.json`` dict (defaults and legacy keys
    resolved as ``from_pretrained`` does)."""
    from transformers import AutoConfig

    if raw.get("model_type", family.model_type) != family.model_type:
        raise ConversionError(f"config.json: model_type {raw.get('model_type')!r} does not match {family.architecture}")
    kwargs = {k: v for k, v in copy.deepcopy(raw).items() if k != "model_type"}
    try:
        return AutoConfig.for_model(family.model_type, **kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ConversionError(f"config.json: transformers cannot read it as {family.architecture} ({err})") from None


def model_from_hf(raw: dict, source: str = "config.json") -> tuple[Family, ModelConfig]:
    """Family and ModelConfig (vocab_size included) of a raw ``config.json`` dict."""
    family = family_of(raw, source)
    return family, family.to_model(hf_config_object(raw, family))


def canonical_architecture(model: ModelConfig) -> dict:
    """The architecture fields with defaults resolved and irrelevant fields dropped, so that two
    ModelConfigs of the same network compare equal."""
    arch = model_architecture(model)
    arch["ffn_hidden_size"] = ffn_hidden_size(model)
    arch["num_query_groups"] = model.num_query_groups or model.num_attention_heads
    arch["kv_channels"] = model.kv_channels or model.hidden_size // model.num_attention_heads
    arch.pop("make_vocab_size_divisible_by")  # how the checkpoint is padded, not the network
    if model.swiglu:
        arch.pop("activation")
    if not model.rope_scaling:
        arch.pop("rope_scaling_factor")
    return arch


def infer_family(model: ModelConfig) -> Family:
    """The family a model without a Hugging Face source is exported as."""
    if model.parallel_residual or model.normalization == "LayerNorm" or model.add_bias_linear:
        return FAMILIES["GPTNeoXForCausalLM"]
    if model.add_qkv_bias:
        return FAMILIES["Qwen2ForCausalLM"]
    if model.sliding_window is not None:
        return FAMILIES["MistralForCausalLM"]
    return FAMILIES["LlamaForCausalLM"]


def export_hf_config(
    model: ModelConfig, family: Family, source: dict | None, dtype: torch.dtype, max_position_embeddings: int
) -> dict:
    """The ``config.json`` of an exported model.

    The source model's config is kept as it is when it describes ``model`` (the round trip gives
    the same config); otherwise the architecture keys are written from ``model`` and the source's
    other keys (token ids, ...) are kept. Either way the result is parsed back and must describe
    ``model`` exactly.

    Args:
        model: the architecture being exported (``vocab_size`` set).
        family: the Hugging Face family to export as.
        source: the source model's raw config.json, if the checkpoint came from one.
        dtype: dtype of the exported weights.
        max_position_embeddings: for a config written from scratch (no source).

    Raises:
        ConversionError: ``family`` cannot express ``model``.
    """
    wanted = canonical_architecture(model)
    config = None
    if source is not None and family_of(source, "source config").architecture == family.architecture:
        if canonical_architecture(family.to_model(hf_config_object(source, family))) == wanted:
            config = copy.deepcopy(source)
    if config is None:
        base = {k: v for k, v in (source or {}).items() if k not in _ROPE_KEYS}
        base.setdefault("max_position_embeddings", max_position_embeddings)
        config = {**base, **family.to_hf(model), "architectures": [family.architecture], "model_type": family.model_type}
        config = hf_config_object(config, family).to_dict()
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    name = str(dtype).removeprefix("torch.")
    if config.get(dtype_key) != name:
        config[dtype_key] = name
    got = canonical_architecture(family.to_model(hf_config_object(config, family)))
    if got != wanted:
        diff = {k: (wanted[k], got.get(k)) for k in wanted if wanted[k] != got.get(k)}
        raise ConversionError(f"the model cannot be written as {family.architecture}: {diff} (wanted, written)")
    return config
