"""SamPO / DPO training: ``torchrun --nproc-per-node N launch/pretrain_sampo.py --config FILE.yaml [--flags]``.

The command line is sampo_megatron/cli/train.py (also installed as ``sampo-train``).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The guard matters: dist_checkpointing's writer starts a spawn-based process that re-imports this file.
if __name__ == "__main__":
    from sampo_megatron.cli.train import main

    main()
