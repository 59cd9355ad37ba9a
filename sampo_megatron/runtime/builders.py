"""Builders every process uses: the architecture a run resolves to, megatron-core model chunks,
the DDP-wrapped policy, the frozen reference replica, the optimizer and the learning-rate schedule.

The trainer, generation (``tools/generate.py``, the verbosity monitor), ``--dry-run`` and
``bench/gpu_check.py`` all build through here, so they cannot drift apart.
"""

from __future__ import annotations

import os

import torch

from ..config import RunConfig, TrainingConfig
from ..models.architecture import CheckpointArchitecture, adopt_architecture
from ..models.gpt import build_model_chunks, transformer_config
from ..models.response_logits import install_output_selection
from .checkpointing import resolve_checkpoint


def resolve_architecture(
    cfg: RunConfig, flags: tuple[str, ...] = ("--save", "--load", "--ref-load")
) -> CheckpointArchitecture | None:
    """Adopt the architecture (and, unless given, the tokenizer) of the checkpoints the run starts from.

    A checkpoint with ``sampo_model.json`` (converted, or saved by the trainer) sets the model's
    architecture fields: no architecture flags to repeat; a set flag that disagrees is an error.

    Args:
        cfg: the run's configuration; its ``model`` (and ``data.tokenizer_model``) are updated.
        flags: which of ``--save``, ``--load``, ``--ref-load`` are sources, in priority order.
    """
    paths = {"--save": cfg.checkpoint.save, "--load": cfg.checkpoint.load, "--ref-load": cfg.reference.ref_load}
    sources = {flag: resolve_checkpoint(paths[flag]) for flag in flags if paths[flag] and os.path.isdir(paths[flag])}
    architecture = adopt_architecture(cfg.model, cfg.explicit_flags, sources)
    if architecture is not None and cfg.data.tokenizer_model is None:
        cfg.data.tokenizer_model = architecture.tokenizer
    return architecture


def virtual_pipeline_size(cfg: RunConfig) -> int | None:
    """Virtual stages per pipeline rank (interleaved schedule), or None."""
    return transformer_config(cfg.model, cfg.parallel, cfg.training).virtual_pipeline_model_parallel_size


def build_chunks(cfg: RunConfig, padded_vocab: int, tconfig=None, frozen: bool = False) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual stage), with the response-logits hook installed.

    Args:
        cfg: the run's configuration (architecture resolved).
        padded_vocab: embedding rows (the vocabulary padded for TP).
        tconfig: the ``TransformerConfig`` to build with (the policy's is the one the schedules and
            the optimizer hooks read); default: a new one from ``cfg``.
        frozen: no gradients, eval mode (a reference replica, a model for generation).
    """
    tconfig = tconfig or transformer_config(cfg.model, cfg.parallel, cfg.training)
    chunks = build_model_chunks(cfg.model, tconfig, padded_vocab, cfg.training.seq_length)
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

    tr = cfg.training
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay, adam_beta1=tr.adam_beta1,
            adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps, clip_grad=tr.clip_grad, bf16=tr.bf16, fp16=tr.fp16,
            params_dtype=tconfig.params_dtype, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model,
    )  # fmt: skip
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(training: TrainingConfig, optimizer, train_iters: int, override: bool):
    """Linear warm-up from 0, then ``--lr-decay-style`` decay to ``--min-lr`` at ``train_iters``.

    Args:
        override: ``--override-opt-param-scheduler`` (Megatron's pair: the checkpoint's schedule
            wins, unless this is set).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=training.lr, min_lr=training.min_lr,
        lr_warmup_steps=int(training.lr_warmup_fraction * train_iters), lr_decay_steps=train_iters,
        lr_decay_style=training.lr_decay_style, start_wd=training.weight_decay, end_wd=training.weight_decay,
        wd_incr_steps=train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override, override_opt_param_scheduler=override,
    )  # fmt: skip
