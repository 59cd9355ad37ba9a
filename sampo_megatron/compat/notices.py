"""Log notices that every run would print (once per rank or per model built) and that no user of
this project can act on, filtered out of their loggers by release line.

Each entry names the logger, the start of the message, and why it is expected. Before a filter is
installed, :func:`quiet_expected_notices` checks that the module still contains the message text
(read from the installed file, without importing it), so a release that rewords one fails loudly
instead of the filter silently matching nothing. Nothing here imports megatron-core or torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from .version import release_line


@dataclass(frozen=True)
class Notice:
    logger: str
    """The logger the notice is emitted on (the module's ``__name__``)."""
    message: str
    """The start of the message."""
    why: str
    """Why a user of this project cannot act on it."""


_ON_EVERY_LINE: tuple[Notice, ...] = (
    Notice("torch.utils.cpp_extension", "No CUDA runtime is found",
           "a CUDA build of torch without a GPU (the Python 3.12 CPU leg installs PyPI's CUDA build); torch only "
           "reports where CUDA_HOME points"),  # fmt: skip
)
_BY_LINE: dict[str, tuple[Notice, ...]] = {
    "0.16": (),
    "0.19": (
        Notice("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
               "0.19 logs it whenever a GPTModel is built (policy and reference); GPTModel is the model this "
               "project builds on every tested line (docs/compatibility.md)"),  # fmt: skip
        Notice("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated",
               "0.19 routes every torch_dist save, synchronous ones too, through its 'mcore' async strategy; "
               "the alternative (NVRx) is not a dependency (compat/async_save.py)"),  # fmt: skip
    ),
}


class _DropNotice(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.message)


_INSTALLED: set[tuple[str, str]] = set()


def expected_notices() -> tuple[Notice, ...]:
    return _ON_EVERY_LINE + _BY_LINE[release_line().name]


def _module_file(name: str) -> str:
    """The source file of module ``name``, found without importing it or its packages (a bad flag
    must answer before megatron-core or torch is imported)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{top} is not installed (needed for {name})")
    return os.path.join(spec.submodule_search_locations[0], *rest) + ".py"


def quiet_expected_notices() -> None:
    """Install the filters (idempotent).

    Raises:
        CompatError: a listed module no longer contains its message (re-survey this file).
    """
    from .cpu import CompatError

    for notice in expected_notices():
        if (notice.logger, notice.message) in _INSTALLED:
            continue
        with open(_module_file(notice.logger), encoding="utf-8") as f:
            if notice.message not in f.read():
                raise CompatError(f"{notice.logger} no longer logs {notice.message!r}; re-survey sampo_megatron/compat/notices.py")
        logging.getLogger(notice.logger).addFilter(_DropNotice(notice.message))
        _INSTALLED.add((notice.logger, notice.message))
