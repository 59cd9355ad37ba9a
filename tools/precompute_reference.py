"""Compute the reference log-prob cache of a run without training it.

The command line is sampo_megatron/cli/precompute_reference.py (also installed as
``sampo-precompute-reference``); it takes the training command's flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The guard matters: dist_checkpointing's writer starts a spawn-based process that re-imports this file.
if __name__ == "__main__":
    from sampo_megatron.cli.precompute_reference import main

    main()
