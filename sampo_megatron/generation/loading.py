"""A model for generation outside the trainer: the architecture and weights of a checkpoint, built
at the TP/PP layout of this launch (dist_checkpointing reshards on load). The set-up is the
trainer's (sampo_megatron/runtime/): launcher variables (torchrun, srun, mpirun), process groups,
compat, model-parallel state, model chunks."""

from __future__ import annotations

from ..config import RunConfig
from ..data import load_tokenizer
from ..models.gpt import model_vocab_sizes
from ..runtime.builders import build_chunks, resolve_architecture, virtual_pipeline_size
from ..runtime.checkpointing import CheckpointContents, load_checkpoint, resolve_checkpoint, select_checkpoint
from ..runtime.distributed import close_distributed, init_distributed, init_model_parallel
from ..validation import ConfigError, validate_or_raise

__all__ = ["close_distributed", "load_for_generation"]


def load_for_generation(cfg: RunConfig):
    """Initialise the process groups and build this rank's chunks with the weights of ``--load``.

    Args:
        cfg: the run configuration (``--load`` and the parallel layout are used; the checkpoint's
            ``sampo_model.json`` sets the architecture and the tokenizer unless given).

    Returns:
        ``(chunks, tokenizer, vocab_size)``: the model in eval mode, its tokenizer, and the real
        vocabulary size (the TP padding columns excluded).
    """
    validate_or_raise(cfg, purpose="generate")
    if resolve_checkpoint(cfg.checkpoint.load) is None:
        raise FileNotFoundError(f"--load {cfg.checkpoint.load}: no checkpoint there")
    resolve_architecture(cfg, flags=("--load",))
    if cfg.data.tokenizer_model is None:
        raise ConfigError(f"--load {cfg.checkpoint.load} names no tokenizer (sampo_model.json): pass --tokenizer-model")
    init_distributed()
    par = init_model_parallel(cfg.parallel, cfg.training.seed, virtual_pipeline_size(cfg))
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    vocab, padded = model_vocab_sizes(cfg.model, tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
    chunks = build_chunks(cfg, padded, frozen=True)
    c = cfg.checkpoint  # verified before anything of it is unpickled (runtime/checkpointing.py)
    ckpt = select_checkpoint(c.load, c.verify_checkpoint, fallback=False, trust=c.trust_checkpoint)
    load_checkpoint(ckpt, chunks, CheckpointContents(), par.dp_cp_group)
    return chunks, tokenizer, vocab
