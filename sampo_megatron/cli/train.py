"""SamPO / DPO preference training on megatron-core (``sampo-train``, ``launch/pretrain_sampo.py``).

    torchrun --nproc-per-node N launch/pretrain_sampo.py --config examples/tiny_cpu.yaml [--flags]

Every flag is listed by ``--help``; ``--config FILE.yaml`` takes the same names as keys and flags
override it. The configuration is validated before megatron-core is imported or any data is read,
so a bad flag answers at once, one line per problem.
"""

from __future__ import annotations

import os
import sys
import warnings

# megatron-core's notices about missing optional GPU libraries, repeated by every rank on CPU.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "When using async grad allreduce",
    "MimoModelConfig is experimental",  # megatron-core 0.19 warns when the package is imported
):
    warnings.filterwarnings("ignore", message=_message)


def user_errors() -> tuple[type[BaseException], ...]:
    """Problems of a run's input or state: their messages name the file, field or step, so they are
    printed without a traceback."""
    from ..compat import CompatError, UnsupportedMegatronError
    from ..config import ConfigFileError
    from ..runtime.checkpointing import CheckpointLoadError
    from ..training.metrics import MissingPackageError
    from ..training.nonfinite import NonFiniteError
    from ..training.reference_cache import CacheMismatchError
    from ..training.run_config import ConfigChangeError
    from ..training.run_lock import RunLockError
    from ..validation import ConfigError

    return (CompatError, UnsupportedMegatronError, CheckpointLoadError, NonFiniteError, ConfigChangeError, RunLockError,
            ConfigError, ConfigFileError, CacheMismatchError, MissingPackageError)  # fmt: skip


def exit_with(err: BaseException, status: int = 1) -> None:
    """Print ``err``'s message (on global rank 0 only: every rank has the same) and exit."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    from ..training.early_signals import record_early

    record_early()  # until the trainer knows whether --exit-signal-handler is on (training/exit.py)
    from ..training.run_lock import die_with_launcher

    die_with_launcher()  # under torchrun: a rank never outlives its launcher (training/run_lock.py)

    try:
        _main(argv)
    finally:
        # Not taken over by a trainer (an error before it, --dry-run): the handlers go back, and
        # a signal recorded meanwhile is delivered as it would have been (training/early_signals.py).
        import signal

        from ..training.early_signals import release_early

        for sig in release_early():
            signal.raise_signal(sig)


def _main(argv: list[str] | None) -> None:
    from ..config import parse_config

    try:
        cfg = parse_config(argv)
        if cfg.plan.dry_run:  # the layout checked and the memory plan printed, nothing built
            from ..planning.dry_run import dry_run_report

            print(dry_run_report(cfg), flush=True)
            return
        from ..compat.notices import quiet_expected_notices

        quiet_expected_notices()  # before anything imports megatron-core (compat/notices.py)
        from ..runtime.builders import resolve_architecture
        from ..validation import validate_or_raise

        resolve_architecture(cfg)  # reads only the checkpoint's sampo_model.json
        validate_or_raise(cfg)  # before megatron-core is imported (the trainer checks again)
        from ..training.trainer import run

        run(cfg)
    except Exception as err:
        if not isinstance(err, user_errors()):  # imported here: --help answers before torch loads
            raise
        exit_with(err)
    except KeyboardInterrupt:
        # Ctrl-C without --exit-signal-handler: stop now, one line. No clean-up: destroying the
        # process groups would wait for ranks still inside a collective; the launcher ends them.
        if os.environ.get("RANK", "0") == "0":
            print("interrupted (Ctrl-C): stopped without saving; run the same command again to resume from the last "
                  "checkpoint (--exit-signal-handler saves first)", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(130)
