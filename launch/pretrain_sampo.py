"""SamPO / DPO preference training on megatron-core.

    torchrun --nproc-per-node N launch/pretrain_sampo.py --config examples/tiny_cpu.yaml [--flags]

Every flag is listed by ``--help``; ``--config FILE.yaml`` takes the same names as keys and flags
override it.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.training.run_lock import die_with_launcher  # noqa: E402

die_with_launcher()  # under torchrun: a rank never outlives its launcher (training/run_lock.py)

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


def _user_errors() -> tuple[type[BaseException], ...]:
    from sampo_megatron.compat import CompatError, UnsupportedMegatronError
    from sampo_megatron.training.checkpointing import CheckpointLoadError
    from sampo_megatron.training.nonfinite import NonFiniteError
    from sampo_megatron.training.run_config import ConfigChangeError
    from sampo_megatron.training.run_lock import RunLockError

    return (CompatError, UnsupportedMegatronError, CheckpointLoadError, NonFiniteError, ConfigChangeError, RunLockError)


USER_ERRORS = _user_errors()


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
    try:
        trainer = Trainer(cfg)
    except USER_ERRORS as err:
        _exit_with(err)
    try:
        trainer.train()
    except BaseException as err:
        trainer.release_lock()  # the run directory is free again (the process is about to exit)
        if isinstance(err, USER_ERRORS):
            _exit_with(err)
        raise
    trainer.close()


def _exit_with(err: BaseException) -> None:
    """A problem of the run's input or state: its message (which names the file, field or step), not
    a traceback; every rank exits with status 1, rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


# The guard matters: dist_checkpointing's writer starts a spawn-based process that re-imports this file.
if __name__ == "__main__":
    main()
