"""megatron-core GPTModel builders: Llama-style decoders (RMSNorm, SwiGLU, RoPE, GQA) and GPT-NeoX
(LayerNorm, GELU, biases, partial rotary, parallel residual)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig
from ..planning.shapes import ffn_hidden_size, padded_vocab_size  # noqa: F401  (the rules; models import them from here)
from .attention import SDPACoreAttention


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


def params_dtype(precision: PrecisionConfig) -> torch.dtype:
    """The parameters' dtype (--bf16 and --fp16 are exclusive: sampo_megatron/validation.py)."""
    return torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    recompute: RecomputeConfig | None = None,
    virtual_pipeline_size: int | None = None,
):
    """The megatron-core ``TransformerConfig`` for this run: the policy's and the reference replica's
    (both are built from it, so precision and recomputation apply to both). It builds on CPU too, FP8
    fields included; whether FP8 can run, like every other rule, is sampo_megatron/validation.py's.

    Args:
        model: the architecture.
        parallel, precision, recompute: the run's sections (default: each section's defaults).
        virtual_pipeline_size: virtual stages per pipeline rank (``RunPlan.virtual_pipeline_size``),
            required with ``--num-layers-per-virtual-pipeline-stage``.
    """
    from megatron.core.transformer import TransformerConfig

    from ..compat.local_spec import batch_p2p_comm

    parallel, precision, recompute = parallel or ParallelConfig(), precision or PrecisionConfig(), recompute or RecomputeConfig()

    if parallel.num_layers_per_virtual_pipeline_stage and virtual_pipeline_size is None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage: pass the plan's virtual_pipeline_size (sampo_megatron/plan.py)")
    on_gpu = torch.cuda.is_available()
    dtype = params_dtype(precision)
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
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu_initialization=not on_gpu,
        fp8=precision.fp8_format,
        fp8_recipe=precision.fp8_recipe,
        first_last_layers_bf16=precision.first_last_layers_bf16,
        num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16,
        recompute_granularity=recompute.recompute_granularity,
        recompute_method=recompute.recompute_method,
        recompute_num_layers=recompute.recompute_num_layers,
        # Fused kernels need apex / TE / CUDA.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        batch_p2p_comm=batch_p2p_comm(),  # compat/local_spec.py
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

    from ..compat.local_spec import cast_float32_params, check_local_spec, with_sequence_parallel_norms

    check_local_spec()
    spec = layer_spec(model)
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=with_sequence_parallel_norms(spec, config, stage) if config.sequence_parallel else spec,
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
        cast_float32_params(chunk, config.params_dtype)  # compat/local_spec.py
        if torch.cuda.is_available():
            # As megatron's get_model: modules that allocate outside megatron's device logic (the
            # local spec's torch norms) start on the CPU; the optimizer and DDP need every parameter here.
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks
