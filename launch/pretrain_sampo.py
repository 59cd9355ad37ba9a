"""SamPO / DPO preference training on megatron-core.

    torchrun --nproc-per-node N launch/pretrain_sampo.py --config examples/tiny_cpu.yaml [--flags]

Every flag is listed by ``--help``; ``--config FILE.yaml`` takes the same names as keys and flags
override it.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.config import parse_config  # noqa: E402
from sampo_megatron.training.trainer import Trainer  # noqa: E402


# megatron-core's notices about missing optional GPU libraries, repeated by every rank on CPU.
for message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "When using async grad allreduce",
):
    warnings.filterwarnings("ignore", message=message)


def main() -> None:
    cfg = parse_config()
    if cfg.plan.dry_run:  # the layout checked and the memory plan printed, nothing built
        from sampo_megatron.planning.dry_run import dry_run_report
        from sampo_megatron.planning.layout import LayoutError

        try:
            print(dry_run_report(cfg), flush=True)
        except LayoutError as err:
            sys.exit(f"error: {err}")
        return
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()


# The guard matters: dist_checkpointing's writer starts a spawn-based process that re-imports this file.
if __name__ == "__main__":
    main()
