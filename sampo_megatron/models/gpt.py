"""megatron-core GPTModel builders for Llama-style decoders (RMSNorm, SwiGLU, RoPE, GQA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig, ParallelConfig, TrainingConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's vocabulary padding: a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def ffn_hidden_size(model: ModelConfig) -> int:
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if not model.swiglu:
        return 4 * model.hidden_size
    # Llama: 2/3 of 4h, rounded up to a multiple of 64.
    return int(64 * math.ceil(int(8 * model.hidden_size / 3) / 64))


def params_dtype(training: TrainingConfig) -> torch.dtype:
    if training.bf16 and training.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def transformer_config(model: ModelConfig, parallel: ParallelConfig, training: TrainingConfig):
    """The megatron-core ``TransformerConfig`` for this run."""
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
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
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
        # Fused kernels need apex / TE / CUDA.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        # Batched p2p on gloo gave wrong gradients with interleaving (shared/notes).
        batch_p2p_comm=on_gpu,
    )


def layer_spec(model: ModelConfig):
    """Transformer Engine spec when asked for (GPU), megatron-core's local spec otherwise."""
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
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)


def build_model_chunks(
    model: ModelConfig, config, vocab_size: int, seq_length: int
) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks: one per virtual pipeline stage (one without interleaving).

    Args:
        model: architecture.
        config: the ``TransformerConfig`` from :func:`transformer_config`.
        vocab_size: padded vocabulary size.
        seq_length: maximum sequence length.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    spec = layer_spec(model)
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            vp_stage=stage,
        )
        chunk.vp_stage = stage
        chunks.append(chunk)
    return chunks
