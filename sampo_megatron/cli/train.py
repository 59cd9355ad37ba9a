"""SamPO / DPO preference training on megatron-core (``sampo-train``, ``launch/pretrain_sampo.py``).

    torchrun --nproc-per-node N launch/pretrain_sampo.py --config examples/tiny_cpu.yaml [--flags]

Every flag is listed by ``--help``; ``--config FILE.yaml`` takes the same names as keys and flags
override it. The configuration is validated before megatron-core is imported or any data is read,
so a bad flag answers at once, one line per problem.
"""

from __future__ import annotations

import os
import sys

TRACEBACK_ENV = "SAMPO_TRACEBACK"
"""Set (to anything but 0) to get the Python traceback of a user error too (docs/launch.md)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Problems of a run's input or state: their messages name the file, field or step, so they are
    printed without a traceback."""
    from ..compat import CompatError, UnsupportedMegatronError
    from ..config import ConfigFileError
    from ..data.errors import BadRecord, DataError
    from ..runtime.checkpointing import CheckpointLoadError
    from ..training.metrics import MissingPackageError
    from ..training.nonfinite import NonFiniteError
    from ..training.reference_cache import CacheMismatchError
    from ..training.run_config import ConfigChangeError
    from ..training.run_lock import RunLockError
    from ..validation import ConfigError

    return (CompatError, UnsupportedMegatronError, CheckpointLoadError, NonFiniteError, ConfigChangeError, RunLockError,
            ConfigError, ConfigFileError, CacheMismatchError, MissingPackageError, BadRecord, DataError)  # fmt: skip


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def record_for_launcher(message: str, callstack: str | None = None) -> None:
    """Write this rank's failure where torchrun reads it (``TORCHELASTIC_ERROR_FILE``, in the format
    of ``torch.distributed.elastic``'s ``record``), so that torchrun's failure summary names the
    cause instead of "To enable traceback see ...". Without torchrun there is no such file.

    Args:
        callstack: the traceback of an unexpected error; a user error's summary shows ``message``.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    info = {"py_callstack": callstack or message, "timestamp": str(int(time.time()))}
    with open(path, "w") as f:
        json.dump({"message": {"message": message, "extraInfo": info}}, f)


def exit_with(err: BaseException, status: int = 1) -> None:
    """End the process on a user error: ``error: <message>`` once per job (global rank 0 prints it:
    every rank has the same), recorded for torchrun's summary on every rank, exit ``status``. With
    ``SAMPO_TRACEBACK=1`` the error is raised instead (a traceback per rank)."""
    if _traceback_wanted():
        raise err
    message = f"error: {err}"
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    record_for_launcher(message)
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
        from ..plan import resolve

        if cfg.plan.dry_run:  # the layout checked and the memory plan printed, nothing built
            from ..planning.dry_run import dry_run_report

            print(dry_run_report(resolve(cfg, purpose="dry_run")), flush=True)
            return
        from ..compat.notices import quiet_expected_notices

        quiet_expected_notices()  # before anything imports megatron-core (compat/notices.py)
        plan = resolve(cfg)  # reads only the checkpoint's sampo_model.json and the tokenizer
        from ..training.trainer import run

        run(plan)
    except Exception as err:
        if not isinstance(err, user_errors()):  # imported here: --help answers before torch loads
            import traceback

            record_for_launcher(f"{type(err).__name__}: {err}", traceback.format_exc())
            raise
        exit_with(err)
    except KeyboardInterrupt:
        # Ctrl-C without --exit-signal-handler: stop now, one line. No clean-up: destroying the
        # process groups would wait for ranks still inside a collective; the launcher ends them.
        if os.environ.get("RANK", "0") == "0":
            print("interrupted (Ctrl-C): stopped without saving; run the same command again to resume from the last "
                  "checkpoint (--exit-signal-handler saves first)", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(130)
