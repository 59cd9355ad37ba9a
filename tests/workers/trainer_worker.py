"""Runs the Trainer in-process and checks the reference replica: frozen, gradient-free, unchanged.

Usage: torchrun ... trainer_worker.py --out RESULT.json <pretrain_sampo flags>
"""

import json
import sys

import torch
import torch.distributed as dist

from sampo_megatron.config import parse_config
from sampo_megatron.plan import resolve
from sampo_megatron.training.trainer import Trainer


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1]
    flags = [a for i, a in enumerate(sys.argv[1:]) if a != "--out" and sys.argv[i] != "--out"]
    trainer = Trainer(resolve(parse_config(flags)))
    before = [{n: p.detach().clone() for n, p in chunk.named_parameters()} for chunk in trainer.reference.chunks]
    policy_before = [{n: p.detach().clone() for n, p in chunk.named_parameters()} for chunk in trainer.chunks]
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainer.train()
    result = {
        "reference_unchanged": all(
            torch.equal(p, before[i][n]) for i, chunk in enumerate(trainer.reference.chunks) for n, p in chunk.named_parameters()
        ),
        "reference_equals_initial_policy": all(
            torch.equal(before[i][n], policy_before[i][n]) for i in range(len(before)) for n in before[i]
        ),
        "policy_changed": any(
            not torch.equal(p, policy_before[i][n]) for i, chunk in enumerate(trainer.chunks) for n, p in chunk.named_parameters()
        ),
        "reference_requires_no_grad": all(not p.requires_grad for c in trainer.reference.chunks for p in c.parameters()),
        "reference_has_no_grads": all(
            p.grad is None and getattr(p, "main_grad", None) is None for c in trainer.reference.chunks for p in c.parameters()
        ),
        "reference_not_in_optimizer": all(
            id(p) not in optimizer_params for c in trainer.reference.chunks for p in c.parameters()
        ),
    }
    flags_all = [None] * dist.get_world_size()
    dist.all_gather_object(flags_all, result)
    if dist.get_rank() == 0:
        merged = {k: all(r[k] for r in flags_all) for k in result}
        with open(out, "w") as f:
            json.dump(merged, f)
    trainer.close()


if __name__ == "__main__":
    main()
