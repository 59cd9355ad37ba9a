"""Per-GPU memory plan of a model and layout, and the layouts that fit.

The command line is sampo_megatron/cli/plan.py (also installed as ``sampo-plan``); ``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
