"""TDPO's first step against a float64 oracle: one process, TP=1, the Trainer in-process.

Before training, runs the policy and the reference (a different checkpoint, ``--ref-load``) on the
first step's micro-batches with full logits, and writes TDPO's loss and rewards from the equations
with float64 full-vocabulary log-softmax (``--length-debias none``); then trains one step, whose
metrics the test compares against it.

Usage: torchrun --nproc-per-node 1 tdpo_oracle_worker.py --out ORACLE.json <pretrain_sampo flags>
"""

import json
import math
import sys

import torch

from sampo_megatron.config import parse_config
from sampo_megatron.plan import resolve
from sampo_megatron.training.trainer import Trainer


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@torch.no_grad()
def full_log_softmax(chunk, batch, vocab_size: int) -> torch.Tensor:
    logits = chunk(batch["tokens"], batch["position_ids"], None)  # [2P, S, V padded]
    return logits[..., :vocab_size].double().log_softmax(-1)


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1]
    flags = [a for i, a in enumerate(sys.argv[1:]) if a != "--out" and sys.argv[i] != "--out"]
    cfg = parse_config(flags)
    assert cfg.loss.length_debias == "none" and cfg.parallel.tensor_model_parallel_size == 1
    trainer = Trainer(resolve(cfg))
    beta, alpha = cfg.loss.beta, cfg.loss.tdpo_alpha
    kl_weight = 1.0 if cfg.loss.loss_type == "tdpo1" else alpha
    _, micro_batches = trainer.feed.micro_batches(0)
    losses, chosen_rewards, rejected_rewards, chosen_kls = [], [], [], []
    for batch in micro_batches:
        pol = full_log_softmax(trainer.chunks[0], batch, trainer.vocab_size)
        ref = full_log_softmax(trainer.reference.chunks[0], batch, trainer.vocab_size)
        mask, labels = batch["response_mask"], batch["labels"]
        token_logratio = (pol - ref).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        token_kl = (ref.exp() * (ref - pol)).sum(-1)
        pairs = mask.shape[0] // 2
        for i in range(pairs):
            w, l = i, pairs + i  # noqa: E741 (the paper's winner, loser)
            r_w, r_l = float(token_logratio[w][mask[w]].sum()), float(token_logratio[l][mask[l]].sum())
            d_w, d_l = float(token_kl[w][mask[w]].sum()), float(token_kl[l][mask[l]].sum())
            losses.append(-logsigmoid(beta * ((r_w - r_l) - kl_weight * (d_l - d_w))))
            chosen_rewards.append(beta * (r_w + d_w))
            rejected_rewards.append(beta * (r_l + d_l))
            chosen_kls.append(d_w)
    oracle = {
        "loss": sum(losses) / len(losses),
        "rewards/chosen": sum(chosen_rewards) / len(losses),
        "rewards/rejected": sum(rejected_rewards) / len(losses),
        "kl/chosen": sum(chosen_kls) / len(losses),
    }
    trainer.train()
    with open(out, "w") as f:
        json.dump(oracle, f)
    trainer.close()


if __name__ == "__main__":
    main()
