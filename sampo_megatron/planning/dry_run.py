"""``--dry-run``: the run's layout checked and its per-GPU memory plan printed, before anything is
built (no GPU, no process group, no checkpoint read beyond its ``sampo_model.json``)."""

from __future__ import annotations

import os
from typing import Mapping

from .memory import format_plan, plan_memory
from .presets import shape_from_model_config
from .shapes import TOKEN_KL_LOSSES, Layout, ModelShape, attention_kind


def layout_from_config(cfg, world_size: int) -> Layout:
    """The :class:`Layout` of a ``RunConfig`` on ``world_size`` GPUs (DP is what TP x PP x CP leave)."""
    par, tr = cfg.parallel, cfg.training
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    vpp = 1
    if par.num_layers_per_virtual_pipeline_stage:
        vpp = max(1, cfg.model.num_layers // par.pipeline_model_parallel_size // par.num_layers_per_virtual_pipeline_stage)
    bf16_layers = tr.num_layers_at_start_in_bf16 + tr.num_layers_at_end_in_bf16 if tr.first_last_layers_bf16 else 0
    return Layout(
        tp=par.tensor_model_parallel_size,
        pp=par.pipeline_model_parallel_size,
        vpp=vpp,
        dp=max(1, world_size // model_parallel),
        cp=par.context_parallel_size,
        micro_batch_size=tr.micro_batch_size,
        global_batch_size=tr.global_batch_size,
        seq_length=tr.seq_length,
        sequence_parallel=par.sequence_parallel,
        distributed_optimizer=par.use_distributed_optimizer,
        recompute_granularity=tr.recompute_granularity,
        recompute_method=tr.recompute_method,
        recompute_num_layers=tr.recompute_num_layers,
        fp8=tr.fp8_format,
        bf16_layers=bf16_layers,
        param_bytes=2 if (tr.bf16 or tr.fp16) else 4,
        ref_mode=cfg.reference.ref_mode,
        token_kl=cfg.loss.loss_type in TOKEN_KL_LOSSES,
        attention=attention_kind(cfg.model.transformer_impl, cfg.model.local_attention),
    )


def model_shape(cfg) -> ModelShape:
    """The model's shape: ``--vocab-size`` (or the checkpoint's), else the tokenizer's size."""
    vocab = cfg.model.vocab_size
    if vocab is None:
        if not cfg.data.tokenizer_model:
            raise ValueError("--dry-run needs the vocabulary: give --vocab-size or --tokenizer-model")
        from ..data import load_tokenizer

        vocab = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type).vocab_size
    return shape_from_model_config(cfg.model, vocab)


def dry_run_report(cfg, environ: Mapping[str, str] | None = None) -> str:
    """Check ``cfg`` as the trainer would (sampo_megatron/validation.py) and return its memory plan as text.

    The world size is ``--world-size``, else the launcher's (``WORLD_SIZE``, ``SLURM_NTASKS``, MPI),
    else 1. A checkpoint's ``sampo_model.json`` under ``--load`` / ``--ref-load`` sets the
    architecture as in a real run.

    Raises:
        ConfigError: the configuration cannot run (every problem listed, in the trainer's words).
    """
    from ..runtime.builders import resolve_architecture
    from ..runtime.launch_env import world_size_from_launcher
    from ..validation import ConfigError, validate_or_raise

    environ = os.environ if environ is None else environ
    resolve_architecture(cfg, flags=("--load", "--ref-load"))
    world_size = cfg.plan.world_size or world_size_from_launcher(environ)
    guessed = world_size is None
    world_size = world_size or 1
    try:
        validate_or_raise(cfg, world_size, purpose="dry_run")
    except ConfigError as err:
        if guessed:  # the likeliest mistake: the run's GPU count was never given
            raise ConfigError(
                f"{err}\n  (no launcher sets the world size here, so 1 GPU was assumed: pass --world-size N)"
            ) from None
        raise
    shape = model_shape(cfg)
    plan = plan_memory(shape, layout_from_config(cfg, world_size))
    return format_plan(plan, cfg.plan.gpu_memory_gib)
