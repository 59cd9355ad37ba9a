"""Builds the Trainer in-process, records which reference it built, trains, and writes the result.

Usage: torchrun ... reference_kind_worker.py --out RESULT.json <pretrain_sampo flags>
"""

import json
import sys

import torch.distributed as dist

from sampo_megatron.config import parse_config
from sampo_megatron.plan import resolve
from sampo_megatron.training.trainer import Trainer


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1]
    flags = [a for i, a in enumerate(sys.argv[1:]) if a != "--out" and sys.argv[i] != "--out"]
    trainer = Trainer(resolve(parse_config(flags)))
    result = {"reference": type(trainer.reference).__name__, "reference_chunks": trainer.reference.chunks is not None}
    trainer.train()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    trainer.close()


if __name__ == "__main__":
    main()
