"""The paper's models as :class:`ModelShape`s, with the numbers of their Hugging Face ``config.json``
written in (no download), and the reader of such a file."""

from __future__ import annotations

import json
import os

from .shapes import ModelShape, ffn_hidden_size, padded_vocab_size

PRESETS: dict[str, ModelShape] = {
    # EleutherAI/pythia-2.8b: GPT-NeoX, parallel residual, rotary_pct 0.25, untied, biases.
    "pythia-2.8b": ModelShape(
        num_layers=32, hidden_size=2560, ffn_hidden_size=10240, num_attention_heads=32, num_query_groups=32,
        vocab_size=50304, swiglu=False, normalization="LayerNorm", add_bias_linear=True,
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3-8b": ModelShape(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256,
    ),
    # allenai/tulu-2-13b (Llama-2-13B; Tulu 2 adds no tokens)
    "tulu2-13b": ModelShape(
        num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, num_query_groups=40,
        vocab_size=32000,
    ),
    # Qwen/Qwen1.5-72B-Chat: no GQA, QKV bias, 152064-row vocabulary.
    "qwen1.5-72b": ModelShape(
        num_layers=80, hidden_size=8192, ffn_hidden_size=24576, num_attention_heads=64, num_query_groups=64,
        vocab_size=152064, add_qkv_bias=True,
    ),
}  # fmt: skip


def shape_from_hf_config(config: dict) -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, GPT-NeoX).

    Raises:
        ValueError: a model type other than those.
    """
    model_type = config.get("model_type", "")
    if model_type == "gpt_neox":
        return ModelShape(
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            ffn_hidden_size=config["intermediate_size"],
            num_attention_heads=config["num_attention_heads"],
            num_query_groups=config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            swiglu=False,
            normalization="LayerNorm",
            add_bias_linear=True,
            untied=not config.get("tie_word_embeddings", False),
        )
    if model_type in ("llama", "mistral", "qwen2"):
        heads = config["num_attention_heads"]
        return ModelShape(
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            ffn_hidden_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            kv_channels=config.get("head_dim"),
            add_qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            untied=not config.get("tie_word_embeddings", False),
        )
    raise ValueError(f"model_type {model_type!r}: the planner knows llama, mistral, qwen2 and gpt_neox")


def load_shape(model: str) -> ModelShape:
    """A preset name (:data:`PRESETS`), a ``config.json`` path, or a directory holding one."""
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"--model {model!r}: neither a preset ({', '.join(PRESETS)}) nor a Hugging Face config.json")
    with open(path) as f:
        return shape_from_hf_config(json.load(f))


def shape_from_model_config(model, vocab_size: int) -> ModelShape:
    """A :class:`ModelShape` from the trainer's ``ModelConfig`` and its vocabulary."""
    return ModelShape(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=ffn_hidden_size(model),
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        vocab_size=vocab_size,
        kv_channels=model.kv_channels,
        swiglu=model.swiglu,
        normalization=model.normalization,
        add_qkv_bias=model.add_qkv_bias,
        add_bias_linear=model.add_bias_linear,
        untied=model.untie_embeddings_and_output_weights,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
    )


def padded_vocab(shape: ModelShape, tp: int) -> int:
    """Megatron's vocabulary padding (a multiple of ``divisible_by x TP``)."""
    return padded_vocab_size(shape.vocab_size, shape.make_vocab_size_divisible_by, tp)
