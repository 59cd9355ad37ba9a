"""Length report of a generations file, and the difference from a second one with an interval.

The command line is sampo_megatron/cli/length_report.py (also installed as ``sampo-length-report``); ``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.length_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
