"""Loads converted checkpoints into megatron-core GPTModels at several TP x PP layouts and saves
their logits (and one re-save through the trainer's checkpointing).

Usage: torchrun --nproc-per-node 4 convert_logits_worker.py --root DIR --cases a,b --layouts 1x1,2x1,1x2,2x2

For each case ``DIR/<case>/mg_tp<T>`` (converted with ``--tensor-model-parallel-size T``) is loaded
at every layout ``TxP`` (the remaining ranks are data-parallel replicas), run forward on
``DIR/tokens.pt`` through megatron's pipeline schedule, and the TP-gathered logits ``[b, s, V_pad]``
are saved to ``DIR/<case>/logits_tp<T>_pp<P>.pt``. At the last layout the ``--resave`` cases are
also saved by the trainer's ``save_checkpoint`` (megatron writes them TP/PP-sharded) to
``DIR/<case>/resaved``, for the export test.
"""

from __future__ import annotations

import argparse
import os
import shutil
from functools import partial

import torch
import torch.distributed as dist

from sampo_megatron.compat import apply_cpu_compat, model_parallel_manual_seed
from sampo_megatron.config import ParallelConfig
from sampo_megatron.models.architecture import ARCHITECTURE_FILE, read_architecture
from sampo_megatron.models.gpt import build_model_chunks, padded_vocab_size, transformer_config
from sampo_megatron.runtime.checkpointing import CheckpointContents, load_checkpoint, save_checkpoint
from sampo_megatron.runtime.distributed import close_distributed, init_distributed, reset_megatron_state


def _forward_step(batch: dict, data_iterator, model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], None)

    def keep_logits(output: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(output).detach().clone()

    return logits, keep_logits


def forward_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """TP-gathered logits ``[b, s, V_pad]`` of ``tokens`` through the pipeline schedule, on the last
    pipeline stage (``None`` elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = tokens.shape[1]
    batch = {"tokens": tokens, "position_ids": torch.arange(seq).expand_as(tokens).contiguous()}
    training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, batch),
            data_iterator=[iter([batch]) for _ in chunks] if len(chunks) > 1 else iter([batch]),
            model=chunks,
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    for chunk, mode in zip(chunks, training):
        chunk.train(mode)
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def is_writer() -> bool:
    """The one rank that holds the full logits: last stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def run_case(root: str, case: str, tp: int, pp: int, tokens: torch.Tensor, resave: bool) -> None:
    """Load ``case`` at TP x PP, save its logits, and optionally save the model again."""
    from megatron.core import parallel_state

    ckpt = os.path.join(root, case, f"mg_tp{tp}")
    model = read_architecture(ckpt).model_config()
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config = transformer_config(model, parallel)
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    seq = tokens.shape[1]
    chunks = build_model_chunks(model, config, padded, seq)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    load_checkpoint(ckpt, chunks, CheckpointContents(), dp_group)
    logits = forward_logits(chunks, tokens)
    if is_writer():
        torch.save(logits, os.path.join(root, case, f"logits_tp{tp}_pp{pp}.pt"))
    if resave:
        target = os.path.join(root, case, "resaved")
        ckpt_dir = save_checkpoint(target, 1, chunks, CheckpointContents(), dp_group)
        if dist.get_rank() == 0:
            shutil.copyfile(os.path.join(ckpt, ARCHITECTURE_FILE), os.path.join(ckpt_dir, ARCHITECTURE_FILE))
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--layouts", default="1x1,2x1,1x2,2x2")
    parser.add_argument("--resave", default="", help="cases to save again (megatron-sharded) at the last layout")
    args = parser.parse_args()
    init_distributed()
    apply_cpu_compat()
    from megatron.core import parallel_state

    tokens = torch.load(os.path.join(args.root, "tokens.pt"))
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    for index, (tp, pp) in enumerate(layouts):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model_parallel_manual_seed(1234)
        for case in args.cases.split(","):
            resave = index == len(layouts) - 1 and case in args.resave.split(",")
            run_case(args.root, case, tp, pp, tokens, resave)
        reset_megatron_state()
    dist.barrier()
    close_distributed()


if __name__ == "__main__":
    main()
