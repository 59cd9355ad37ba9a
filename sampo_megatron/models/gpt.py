"""megatron-core GPTModel builders: Llama-style decoders (RMSNorm, SwiGLU, RoPE, GQA) and GPT-NeoX
(LayerNorm, GELU, biases, partial rotary, parallel residual)."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from ..config import ModelConfig, ParallelConfig, TrainingConfig
from ..planning.shapes import ffn_hidden_size, padded_vocab_size  # noqa: F401  (the rules; models import them from here)
from .attention import SDPACoreAttention


def model_vocab_sizes(model: ModelConfig, tokenizer_vocab_size: int, tp_size: int) -> tuple[int, int]:
    """The model's vocabulary and its TP-padded embedding rows.

    A checkpoint padded for another TP size still loads: megatron-core loads embedding and output
    rows with ``allow_shape_mismatch`` (the overlap is read, the rest is zero), and rows past the
    vocabulary are padding either way.

    Args:
        model: architecture; ``vocab_size`` comes from a converted checkpoint.
        tokenizer_vocab_size: ids the tokenizer can produce.
        tp_size: tensor-parallel size.

    Returns:
        ``(vocab, padded)``: the columns of the softmax (the padding columns are left out of it),
        and the rows of the embedding and output layer.
    """
    vocab = model.vocab_size or tokenizer_vocab_size
    if tokenizer_vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab_size} ids but the model's vocabulary has only {vocab} "
            "(--vocab-size, or the checkpoint's sampo_model.json): use the model's own tokenizer"
        )
    return vocab, padded_vocab_size(vocab, model.make_vocab_size_divisible_by, tp_size)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF ``gelu_new``, ``gelu_fast``, ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


def activation_func(model: ModelConfig):
    """The MLP activation: SiLU (gated, SwiGLU) or a GELU."""
    if model.swiglu:
        return F.silu
    if model.activation == "gelu":
        return F.gelu
    if model.activation == "gelu_tanh":
        return gelu_tanh
    raise ValueError(f"unknown --activation {model.activation!r}: expected gelu or gelu_tanh")


def params_dtype(training: TrainingConfig) -> torch.dtype:
    if training.bf16 and training.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def fp8_unavailable_reason(model: ModelConfig, training: TrainingConfig, cuda: bool, transformer_engine: bool) -> str | None:
    """Why ``--fp8-format`` cannot run here, or ``None`` when it can (or FP8 is off).

    Args:
        model: architecture (``transformer_impl``).
        training: precision flags.
        cuda: a CUDA GPU is present.
        transformer_engine: ``transformer_engine`` imports.
    """
    if training.fp8_format is None:
        return None
    flag = f"--fp8-format {training.fp8_format}"
    if not cuda:
        return f"{flag} needs a CUDA GPU with FP8 support (H100/H200 or newer); this machine has none (drop the flag on CPU)"
    if not transformer_engine:
        return f"{flag} needs Transformer Engine: pip install 'sampo-megatron[gpu]' (NGC PyTorch containers ship it)"
    if model.transformer_impl != "transformer_engine":
        return f"{flag} needs --transformer-impl transformer_engine (FP8 GEMMs are Transformer Engine layers)"
    if not training.bf16:
        return f"{flag} needs --bf16 (the FP8 GEMMs' inputs, outputs and master weights around them)"
    return None


def check_fp8_available(model: ModelConfig, training: TrainingConfig) -> None:
    """Raise a clear error when FP8 is asked for on a machine or build that cannot run it."""
    if training.fp8_format is None:
        return
    cuda = torch.cuda.is_available()
    try:
        import transformer_engine  # noqa: F401

        te = True
    except ImportError:
        te = False
    reason = fp8_unavailable_reason(model, training, cuda, te)
    if reason:
        raise RuntimeError(reason)


def attention_window_problem(model: ModelConfig, seq_length: int) -> str | None:
    """Why ``seq_length`` cannot run with the model's attention window (Mistral), or None."""
    if model.sliding_window is None or seq_length <= model.sliding_window:
        return None
    return (
        f"--seq-length {seq_length} exceeds the model's attention window ({model.sliding_window} tokens, sliding_window): "
        "attention here is fully causal, which equals the windowed attention only for sequences within the window"
    )


def transformer_config(model: ModelConfig, parallel: ParallelConfig, training: TrainingConfig):
    """The megatron-core ``TransformerConfig`` for this run: the policy's and the reference replica's
    (both are built from it, so precision and recomputation apply to both). It builds on CPU too, FP8
    fields included; whether FP8 can run is :func:`check_fp8_available`'s question."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    dtype = params_dtype(training)
    vp_size = None
    if parallel.num_layers_per_virtual_pipeline_stage:
        per_stage = model.num_layers // parallel.pipeline_model_parallel_size
        if per_stage % parallel.num_layers_per_virtual_pipeline_stage:
            raise ValueError(
                f"layers per pipeline stage ({per_stage}) is not divisible by "
                f"--num-layers-per-virtual-pipeline-stage {parallel.num_layers_per_virtual_pipeline_stage}"
            )
        vp_size = per_stage // parallel.num_layers_per_virtual_pipeline_stage
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=ffn_hidden_size(model),
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=activation_func(model),
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vp_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=training.bf16,
        fp16=training.fp16,
        use_cpu_initialization=not on_gpu,
        fp8=training.fp8_format,
        fp8_recipe=training.fp8_recipe,
        first_last_layers_bf16=training.first_last_layers_bf16,
        num_layers_at_start_in_bf16=training.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=training.num_layers_at_end_in_bf16,
        recompute_granularity=training.recompute_granularity,
        recompute_method=training.recompute_method,
        recompute_num_layers=training.recompute_num_layers,
        # Fused kernels need apex / TE / CUDA.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        # Batched p2p on gloo gave wrong gradients with interleaving (docs/compatibility.md).
        batch_p2p_comm=on_gpu,
    )


def layer_spec(model: ModelConfig):
    """Transformer Engine spec when asked for (GPU), megatron-core's local spec otherwise (with
    :class:`~sampo_megatron.models.attention.SDPACoreAttention` unless ``--local-attention
    megatron``); with ``parallel_residual`` its layer is :class:`ParallelResidualTransformerLayer`."""
    spec = _base_layer_spec(model)
    if model.parallel_residual:
        from .parallel_residual import ParallelResidualTransformerLayer

        spec = dataclasses.replace(spec, module=ParallelResidualTransformerLayer)
    return spec


def _base_layer_spec(model: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    if model.transformer_impl == "transformer_engine":
        if not torch.cuda.is_available():
            raise RuntimeError("--transformer-impl transformer_engine needs a CUDA GPU; use --transformer-impl local on CPU")
        try:
            import transformer_engine  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "--transformer-impl transformer_engine needs Transformer Engine: pip install 'sampo-megatron[gpu]'"
            ) from err
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)
    if model.local_attention == "megatron":
        return spec
    return _with_core_attention(spec, SDPACoreAttention)


def _with_core_attention(spec, core_attention):
    """``spec`` with its self-attention's ``core_attention`` replaced (a module without parameters:
    checkpoints are unchanged)."""
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core_attention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


class SequenceParallelTorchNorm:
    """megatron-core's torch norm (``WrappedTorchNorm``: ``torch.nn.LayerNorm`` / ``RMSNorm``) with
    sequence parallelism.

    ``WrappedTorchNorm`` (what the local spec uses for RMSNorm, and for LayerNorm without Apex)
    asserts on ``sequence_parallel`` (``transformer/torch_norm.py:32``). A norm acts per token, so its
    forward is already right on a sequence-sharded input; only its parameters' gradients are partial
    sums over each TP rank's tokens. Marking the parameters ``sequence_parallel`` (as Apex's
    ``FusedLayerNorm`` and TE's norms do) makes ``finalize_model_grads`` all-reduce them over TP
    (``distributed/finalize_model_grads.py:354``).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        local = copy.copy(config)  # WrappedTorchNorm's checks minus sequence parallelism
        local.sequence_parallel = False
        norm = WrappedTorchNorm(local, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _with_sequence_parallel_norms(spec, config, vp_stage: int | None):
    """The block spec for ``spec``'s layers with every ``WrappedTorchNorm`` (the layers' and the
    final norm, which megatron-core picks itself, ``transformer_block.py:258``) replaced by
    :class:`SequenceParallelTorchNorm`. Specs whose norms support sequence parallelism (Transformer
    Engine, Apex) are returned unchanged."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    submodules = spec.submodules
    norms = {
        f.name: SequenceParallelTorchNorm
        for f in dataclasses.fields(submodules)
        if getattr(submodules, f.name) is WrappedTorchNorm
    }
    final_norm = transformer_block.LayerNormImpl
    if not norms and final_norm is not WrappedTorchNorm:
        return spec
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(submodules, **norms))
    return transformer_block.TransformerBlockSubmodules(
        layer_specs=[layer] * transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=SequenceParallelTorchNorm if final_norm is WrappedTorchNorm else final_norm,
    )


def _cast_float32_params(chunk: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give fp32 parameters of a bf16/fp16 model the model's dtype, as Megatron-LM's ``Float16Module``
    does: the local spec's torch (and Apex) norms are built in fp32 whatever ``params_dtype`` says,
    and megatron's fp16/bf16 optimizer cannot checkpoint fp32 parameters of a 16-bit model
    (``optimizer.py:812`` maps only its float16 groups: "Param id .. does not match any model
    sharded param")."""
    if dtype == torch.float32:
        return
    for param in chunk.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(dtype)


def build_model_chunks(model: ModelConfig, config, vocab_size: int, seq_length: int) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks: one per virtual pipeline stage (one without interleaving).

    Args:
        model: architecture.
        config: the ``TransformerConfig`` from :func:`transformer_config`.
        vocab_size: padded vocabulary size.
        seq_length: maximum sequence length.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    problem = attention_window_problem(model, seq_length)
    if problem:
        raise ValueError(problem)
    spec = layer_spec(model)
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=_with_sequence_parallel_norms(spec, config, stage) if config.sequence_parallel else spec,
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=stage,
        )
        chunk.vp_stage = stage
        _cast_float32_params(chunk, config.params_dtype)
        if torch.cuda.is_available():
            # As megatron's get_model: modules that allocate outside megatron's device logic (the
            # local spec's torch norms) start on the CPU; the optimizer and DDP need every parameter here.
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks
