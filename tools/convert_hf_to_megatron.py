"""Import a Hugging Face model into a megatron-core torch_dist checkpoint.

The command line is sampo_megatron/cli/convert_hf.py (also installed as ``sampo-convert-hf``); ``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.convert_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
