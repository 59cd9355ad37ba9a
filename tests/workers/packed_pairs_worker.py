"""One step of the real Trainer for each objective, recording every pair's values and the gradients.

Usage: torchrun ... packed_pairs_worker.py --out RESULT.pt <pretrain_sampo flags>  (packing is
set by the worker)

The policy's weights are moved away from the reference's by a layout-independent perturbation (a
function of each parameter's global name, sharded like the parameter), so that rewards are not all
zero. For each objective below, the step's micro-batches go through megatron-core's schedule with
the trainer's own ``policy_forward_step``; the loss function is wrapped to record, per sample id, the
pair's loss, every per-pair metric (rewards debiased and full, log-prob sums, lengths) and the
response tokens' log-probs. After the backward (and ``finalize_model_grads``), the full (TP-gathered,
all stages) gradients are recorded. All of it twice, with the step's pairs in padded micro-batches
and in packed ones (the same trainer and weights). Rank 0 saves ``{"unpacked" | "packed": {objective:
{"pairs": {sample id: {name: value}}, "grads": {global name: tensor}, "packed": bool}}}``.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from functools import partial

import torch
import torch.distributed as dist

from sampo_megatron.config import parse_config
from sampo_megatron.losses import PreferenceInputs, preference_loss
from sampo_megatron.models import weights
from sampo_megatron.plan import resolve
from sampo_megatron.training import step as step_fns
from sampo_megatron.training.feed import schedule_seq_length
from sampo_megatron.training.trainer import Trainer

# (loss type, length debias, SamPO mask mode)
OBJECTIVES = {
    "dpo": ("sigmoid", "none", "shared"),
    "sampo_shared": ("sigmoid", "sampo", "shared"),
    "sampo_independent": ("sigmoid", "sampo", "independent"),
    "sampo_topk": ("sigmoid", "sampo_topk", "shared"),
    "sanorm": ("sigmoid", "sanorm", "shared"),
    "simpo": ("simpo", "none", "shared"),
}


def perturb_policy(trainer: Trainer) -> None:
    """Add ``0.02 * N(0, 1)`` noise, seeded by the global parameter name, to the policy."""
    tp_group = trainer.par.tp_group
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    with torch.no_grad():
        for chunk in trainer.chunks:
            names = weights.global_param_names(chunk)
            gated = bool(chunk.config.gated_linear_unit)
            for local_name, param in chunk.named_parameters():
                name = names[local_name]
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                full = 0.02 * torch.randn(weights.full_shape(param, tp_size), generator=gen)
                param.add_(weights.shard_of(full, name, param, tp_rank, tp_size, gated))


def record_pairs(ctx, epoch: int, batch, compact: bool, logits: torch.Tensor, pairs: dict) -> None:
    """Recompute this micro-batch's per-pair values (as ``_policy_loss`` does) and store them."""
    with torch.no_grad():
        logps = step_fns.token_logprobs(batch, logits.detach(), ctx, compact=compact, inplace_backward=False)
        out = preference_loss(
            PreferenceInputs(logps, batch["response_mask"], batch["sample_ids"], batch.get("ref_logps")),
            ctx.loss, epoch=epoch, cp_group=ctx.cp_group,
        )  # fmt: skip
    mask = batch["response_mask"]
    count = len(batch["sample_ids"])
    for i, sample_id in enumerate(batch["sample_ids"].tolist()):
        values = {name: float(v[i]) for name, v in out.metrics.items()}
        values["token_logps/chosen"] = logps[i][mask[i]].clone()
        values["token_logps/rejected"] = logps[count + i][mask[count + i]].clone()
        pairs[sample_id] = values


def one_step(trainer: Trainer, pairs: dict) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward and backward of step 0 (no optimizer step).

    Returns:
        This rank's full gradients, and whether its micro-batches were packed rows.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ctx = trainer.ctx
    epoch, micro_batches = trainer.feed.micro_batches(0)
    trainer.reference.on_step(epoch, 0)
    trainer.reference.attach(micro_batches)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits, compact = step_fns._model_logits(ctx, batch, model)
        loss_func = partial(step_fns._policy_loss, ctx, epoch, batch, compact)

        def recorded(output: torch.Tensor):
            record_pairs(ctx, epoch, batch, compact, output, pairs)
            return loss_func(output)

        return logits, recorded

    for m in trainer.model:
        m.zero_grad_buffer()
    iterators = [iter(micro_batches) for _ in trainer.model]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(trainer.model) > 1 else iterators[0],
        model=trainer.model,
        num_microbatches=len(micro_batches),
        seq_length=schedule_seq_length(micro_batches, trainer.cfg.training.seq_length, ctx.packed),
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    grads = {}
    for chunk in trainer.chunks:
        names = weights.global_param_names(chunk)
        gated = bool(chunk.config.gated_linear_unit)
        for local_name, param in chunk.named_parameters():
            name = names[local_name]
            grads[name] = weights.gather_full(param.main_grad, name, param, trainer.par.tp_group, gated)
    return grads, all("cu_seqlens" in batch for batch in micro_batches)


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1]
    flags = [a for i, a in enumerate(sys.argv[1:]) if a != "--out" and sys.argv[i] != "--out"]
    trainer = Trainer(resolve(parse_config(flags)))
    perturb_policy(trainer)
    batches = trainer.feed.batches
    capacity = 2 * trainer.cfg.training.micro_batch_size * trainer.cfg.training.seq_length
    results = {}
    for layout, objective, (loss_type, debias, mask_mode) in (
        (layout, *item) for layout in ("unpacked", "packed") for item in OBJECTIVES.items()
    ):
        # the same trainer serves both layouts: only how the step's pairs form micro-batches changes
        batches.pack_capacity = capacity if layout == "packed" else None
        trainer.ctx.packed = layout == "packed"  # the step's context says which (as the plan would)
        trainer.ctx.loss = dataclasses.replace(trainer.cfg.loss, loss_type=loss_type, length_debias=debias, sampo_mask=mask_mode)
        pairs: dict = {}
        grads, packed = one_step(trainer, pairs)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"pairs": pairs, "grads": grads, "packed": packed})
        # DP replicas hold identical gradients, pipeline stages disjoint ones; DP ranks disjoint pairs
        merged: dict = {"pairs": {}, "grads": {}, "packed": all(part["packed"] for part in gathered)}
        for part in gathered:
            merged["pairs"].update(part["pairs"])
            for name, grad in part["grads"].items():
                merged["grads"].setdefault(name, grad)
        results.setdefault(layout, {})[objective] = merged
    if dist.get_rank() == 0:
        torch.save(results, out)
    trainer.close()


if __name__ == "__main__":
    main()
