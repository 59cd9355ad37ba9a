"""Builders every process uses, from the run's resolved plan (sampo_megatron/plan.py): megatron-core
model chunks, the DDP-wrapped policy, the frozen reference replica, the optimizer and the
learning-rate schedule.

The trainer, generation (``tools/generate.py``, the verbosity monitor), ``--dry-run`` and
``bench/gpu_check.py`` all build through here, so they cannot drift apart.
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..models.gpt import build_model_chunks, transformer_config
from ..models.response_logits import install_output_selection
from ..plan import RunPlan


def run_transformer_config(plan: RunPlan):
    """The ``TransformerConfig`` of ``plan``'s model (models/gpt.py), with the plan's virtual stages."""
    c = plan.config
    return transformer_config(c.model, c.parallel, c.precision, c.recompute, virtual_pipeline_size=plan.virtual_pipeline_size)


def build_chunks(plan: RunPlan, tconfig=None, frozen: bool = False) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual stage), with the response-logits hook installed.

    Args:
        plan: the run's resolved plan (architecture, padded vocabulary, sequence length).
        tconfig: the ``TransformerConfig`` to build with (the policy's is the one the schedules and
            the optimizer hooks read); default: a new one from ``plan``.
        frozen: no gradients, eval mode (a reference replica, a model for generation).
    """
    tconfig = tconfig or run_transformer_config(plan)
    chunks = build_model_chunks(plan.config.model, tconfig, plan.padded_vocab_size, plan.config.training.seq_length)
    for chunk in chunks:
        if frozen:
            chunk.requires_grad_(False)
            chunk.eval()
        install_output_selection(chunk)
    return chunks


def wrap_ddp(cfg: RunConfig, tconfig, chunks: list[torch.nn.Module]) -> list:
    """megatron DDP around each chunk (gradients reduced in fp32; the first chunk bucketed)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer
    )
    return [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg: RunConfig, tconfig, model: list):
    """megatron-core's Adam (AdamW) over the DDP-wrapped chunks, hooked into ``tconfig`` for the schedules."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt, precision = cfg.optimizer, cfg.precision
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=cfg.schedule.min_lr, weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad, bf16=precision.bf16, fp16=precision.fp16,
            params_dtype=tconfig.params_dtype, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model,
    )  # fmt: skip
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: RunConfig, optimizer, train_iters: int):
    """Linear warm-up from 0, then ``--lr-decay-style`` decay to ``--min-lr`` at ``train_iters``;
    with ``--override-opt-param-scheduler`` (Megatron's pair) the flags' schedule wins over a
    resumed checkpoint's."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt, schedule, override = cfg.optimizer, cfg.schedule, cfg.checkpoint.override_opt_param_scheduler
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=schedule.min_lr,
        lr_warmup_steps=int(schedule.lr_warmup_fraction * train_iters), lr_decay_steps=train_iters,
        lr_decay_style=schedule.lr_decay_style, start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override, override_opt_param_scheduler=override,
    )  # fmt: skip
