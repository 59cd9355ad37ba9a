"""SamPO / DPO preference training on megatron-core.

    torchrun --nproc-per-node N launch/pretrain_sampo.py --config examples/tiny_cpu.yaml [--flags]

Every flag is listed by ``--help``; ``--config FILE.yaml`` takes the same names as keys and flags
override it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.config import parse_config  # noqa: E402
from sampo_megatron.training.trainer import Trainer  # noqa: E402


def main() -> None:
    Trainer(parse_config()).train()


# The guard matters: dist_checkpointing's writer starts a spawn-based process that re-imports this file.
if __name__ == "__main__":
    main()
