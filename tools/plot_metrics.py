"""PNG figures from ``--metrics-file`` JSONL files, several runs overlaid.

The command line is sampo_megatron/cli/plot_metrics.py (also installed as ``sampo-plot-metrics``);
``--help`` lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.cli.plot_metrics import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
