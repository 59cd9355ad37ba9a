"""Tokenise a preference set into megatron-core indexed datasets.

The command line is sampo_megatron/cli/preprocess.py (also installed as ``sampo-preprocess``); ``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
