"""``--dry-run``: the run's layout checked and its per-GPU memory plan printed, before anything is
built (no GPU, no process group, no checkpoint read beyond its ``sampo_model.json``)."""

from __future__ import annotations

from .memory import format_plan, plan_memory
from .presets import shape_from_model_config
from .shapes import TOKEN_KL_LOSSES, Layout, ModelShape, attention_kind


def layout_from_config(cfg, world_size: int) -> Layout:
    """The :class:`Layout` of a ``RunConfig`` on ``world_size`` GPUs (DP is what TP x PP x CP leave)."""
    par, tr, pr, rc = cfg.parallel, cfg.training, cfg.precision, cfg.recompute
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    vpp = 1
    if par.num_layers_per_virtual_pipeline_stage:
        vpp = max(1, cfg.model.num_layers // par.pipeline_model_parallel_size // par.num_layers_per_virtual_pipeline_stage)
    bf16_layers = pr.num_layers_at_start_in_bf16 + pr.num_layers_at_end_in_bf16 if pr.first_last_layers_bf16 else 0
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
        recompute_granularity=rc.recompute_granularity,
        recompute_method=rc.recompute_method,
        recompute_num_layers=rc.recompute_num_layers,
        fp8=pr.fp8_format,
        bf16_layers=bf16_layers,
        param_bytes=2 if (pr.bf16 or pr.fp16) else 4,
        ref_mode=cfg.reference.ref_mode,
        token_kl=cfg.loss.loss_type in TOKEN_KL_LOSSES,
        fused_logprobs=tr.fused_logprobs,
        attention=attention_kind(cfg.model.transformer_impl, cfg.model.local_attention),
    )


def model_shape(cfg, vocab_size: int) -> ModelShape:
    """The model's shape with ``vocab_size`` (``--vocab-size``, the checkpoint's, or the tokenizer's)."""
    return shape_from_model_config(cfg.model, vocab_size)


def dry_run_report(plan) -> str:
    """The memory plan of a resolved ``--dry-run`` plan (sampo_megatron/plan.py: ``purpose="dry_run"``)
    as text.

    :func:`sampo_megatron.plan.resolve` checked the configuration as the trainer would, with the
    world size of ``--world-size``, else the launcher's (``WORLD_SIZE``, ``SLURM_NTASKS``, MPI),
    else 1, and the architecture of a checkpoint under ``--load`` / ``--ref-load`` adopted.
    """
    cfg = plan.config
    return format_plan(plan_memory(model_shape(cfg, plan.vocab_size), plan.layout), cfg.plan.gpu_memory_gib)
