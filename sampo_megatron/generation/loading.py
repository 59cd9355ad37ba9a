"""A model for generation outside the trainer: the architecture and weights of a checkpoint, built
at the TP/PP layout of this launch (dist_checkpointing reshards on load)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data import load_tokenizer
from ..models.architecture import adopt_architecture
from ..models.gpt import build_model_chunks, model_vocab_sizes, transformer_config
from ..training.checkpointing import CheckpointContents, load_checkpoint, resolve_checkpoint, select_checkpoint


def _init_distributed() -> None:
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def load_for_generation(cfg: RunConfig):
    """Initialise the process groups and build this rank's chunks with the weights of ``--load``.

    Args:
        cfg: the run configuration (``--load`` and the parallel layout are used; the checkpoint's
            ``sampo_model.json`` sets the architecture and the tokenizer unless given).

    Returns:
        ``(chunks, tokenizer, vocab_size)``: the model in eval mode, its tokenizer, and the real
        vocabulary size (the TP padding columns excluded).
    """
    if not cfg.checkpoint.load:
        raise ValueError("--load is required: the checkpoint to generate from")
    ckpt = resolve_checkpoint(cfg.checkpoint.load) if os.path.isdir(cfg.checkpoint.load) else None
    if ckpt is None:
        raise FileNotFoundError(f"--load {cfg.checkpoint.load}: no checkpoint there")
    arch = adopt_architecture(cfg.model, getattr(cfg, "explicit_flags", None), {"--load": ckpt})
    if arch is not None and cfg.data.tokenizer_model is None:
        cfg.data.tokenizer_model = arch.tokenizer
    if cfg.data.tokenizer_model is None:
        raise ValueError(f"--load {ckpt} names no tokenizer (sampo_model.json): pass --tokenizer-model")
    if cfg.parallel.context_parallel_size > 1:
        raise ValueError("generation does not support --context-parallel-size > 1")
    _init_distributed()
    from ..compat import apply_cpu_compat

    apply_cpu_compat()
    from megatron.core import parallel_state, tensor_parallel

    tconfig = transformer_config(cfg.model, cfg.parallel, cfg.training)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=tconfig.virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    vocab, padded = model_vocab_sizes(cfg.model, tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
    chunks = build_model_chunks(cfg.model, tconfig, padded, cfg.training.seq_length)
    c = cfg.checkpoint  # verified before anything of it is unpickled (training/checkpointing.py)
    ckpt = select_checkpoint(cfg.checkpoint.load, c.verify_checkpoint, fallback=False, trust=c.trust_checkpoint)
    load_checkpoint(ckpt, chunks, CheckpointContents(), parallel_state.get_data_parallel_group(with_context_parallel=True))
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks, tokenizer, vocab


def close_distributed() -> None:
    """Destroy the process groups (gloo threads left to interpreter exit can abort the process)."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
