"""Export a trainer (or converted) checkpoint to a Hugging Face model directory.

The command line is sampo_megatron/cli/export_hf.py (also installed as ``sampo-export-hf``); ``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
