"""A model for generation outside the trainer: the architecture and weights of a checkpoint, built
at the TP/PP layout of this launch (dist_checkpointing reshards on load). The set-up is the
trainer's (sampo_megatron/runtime/): launcher variables (torchrun, srun, mpirun), process groups,
compat, model-parallel state, model chunks."""

from __future__ import annotations

from ..plan import RunPlan
from ..runtime.builders import build_chunks
from ..runtime.checkpointing import CheckpointContents, load_checkpoint, select_checkpoint
from ..runtime.distributed import close_distributed, init_distributed, init_model_parallel

__all__ = ["close_distributed", "load_for_generation"]


def load_for_generation(plan: RunPlan):
    """Initialise the process groups and build this rank's chunks with the weights of ``--load``.

    Args:
        plan: the resolved plan (``resolve(cfg, purpose="generate")``: the checkpoint's
            ``sampo_model.json`` set the architecture and the tokenizer unless given).

    Returns:
        ``(chunks, tokenizer, vocab_size)``: the model in eval mode, its tokenizer, and the real
        vocabulary size (the TP padding columns excluded).
    """
    if plan.purpose != "generate":
        raise ValueError(f"load_for_generation needs a plan resolved for generation, got purpose {plan.purpose!r}")
    cfg = plan.config
    init_distributed()
    par = init_model_parallel(cfg.parallel, cfg.training.seed, plan.virtual_pipeline_size)
    chunks = build_chunks(plan, frozen=True)
    c = cfg.checkpoint  # verified before anything of it is unpickled (runtime/checkpointing.py)
    ckpt = select_checkpoint(c.load, c.verify_checkpoint, fallback=False, trust=c.trust_checkpoint)
    load_checkpoint(ckpt, chunks, CheckpointContents(), par.dp_cp_group)
    return chunks, plan.tokenizer, plan.vocab_size
