"""Generate responses from a checkpoint at any TP/PP layout (run it under torchrun, srun or mpirun).

The command line is sampo_megatron/cli/generate.py (also installed as ``sampo-generate``); ``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
