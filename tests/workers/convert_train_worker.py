"""Trains a converted checkpoint with the Trainer, after checking that policy and reference hold it.

Usage: torchrun ... convert_train_worker.py --tokens T.pt --out LOGITS.pt <pretrain_sampo flags>

Before training, the TP-gathered logits of the policy and of the reference replica on ``--tokens``
are saved to ``--out`` (with the vocabulary the trainer uses), so the test can compare both with
the Hugging Face model's logits; then the run trains as ``launch/pretrain_sampo.py`` would.
"""

import sys

import torch
from convert_logits_worker import forward_logits, is_writer

from sampo_megatron.config import parse_config
from sampo_megatron.plan import resolve
from sampo_megatron.training.trainer import Trainer


def main() -> None:
    argv = sys.argv[1:]
    own = {}
    for flag in ("--tokens", "--out"):
        i = argv.index(flag)
        own[flag] = argv[i + 1]
        del argv[i : i + 2]
    trainer = Trainer(resolve(parse_config(argv)))
    tokens = torch.load(own["--tokens"])
    policy = forward_logits(trainer.chunks, tokens)
    reference = forward_logits(trainer.reference.chunks, tokens)
    if is_writer():
        torch.save({"policy": policy, "reference": reference, "vocab_size": trainer.vocab_size}, own["--out"])
    trainer.train()
    trainer.close()


if __name__ == "__main__":
    main()
