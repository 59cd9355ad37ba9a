"""Log notices and Python warnings that every run would print (once per rank or per model built)
and that no user of this project can act on, filtered by release line.

Each entry names the logger (a notice) or the module that warns (a warning), the start of the
message, and why it is expected. Before a filter is installed, :func:`quiet_expected_notices`
checks that the module still contains the message text (read from the installed file, without
importing it), so a release that rewords one fails loudly instead of the filter silently matching
nothing. Nothing here imports megatron-core or torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
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


@dataclass(frozen=True)
class ExpectedWarning:
    module: str
    """A module whose source holds the message (``warnings.warn`` there, or a deprecation it declares)."""
    message: str
    """The start of the warning's message."""
    why: str
    """Why a user of this project cannot act on it."""


_WARNINGS_ON_EVERY_LINE: tuple[ExpectedWarning, ...] = (
    ExpectedWarning("megatron.core.optimizer.optimizer", "Transformer Engine and Apex are not installed",
                    "the CPU / local-spec build: megatron-core falls back to torch's multi-tensor ops (docs/compatibility.md)"),  # fmt: skip
    ExpectedWarning("megatron.core.models.gpt.gpt_layer_specs", "Apex is not installed",
                    "the local spec's norms are torch's (compat/local_spec.py); Apex is optional"),  # fmt: skip
    ExpectedWarning("megatron.core.transformer.transformer_config", "full scope is deprecated",
                    "megatron-core's own default cuda_graph_scope; no CUDA graphs are used"),  # fmt: skip
    ExpectedWarning("megatron.core.tensor_parallel.layers", "When using async grad allreduce",
                    "megatron-core's advice for CUDA_DEVICE_MAX_CONNECTIONS, printed on CPU too"),  # fmt: skip
    ExpectedWarning("torch.distributed.checkpoint.state_dict_loader", "`load_state_dict` is deprecated",
                    "megatron-core's torch_dist load calls torch's older entry point"),  # fmt: skip
    ExpectedWarning("torch.distributed._shard._utils", "Please use DTensor instead and we are deprecating ShardedTensor",
                    "megatron-core's torch_dist checkpoints hold ShardedTensors; torch warns while loading them"),  # fmt: skip
)
_WARNINGS_BY_LINE: dict[str, tuple[ExpectedWarning, ...]] = {
    "0.16": (),
    "0.19": (
        ExpectedWarning("megatron.core.models.mimo.config.base_configs", "MimoModelConfig is experimental",
                        "0.19 warns when the package is imported; no multimodal model is built"),  # fmt: skip
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


def expected_warnings() -> tuple[ExpectedWarning, ...]:
    return _WARNINGS_ON_EVERY_LINE + _WARNINGS_BY_LINE[release_line().name]


def _module_file(name: str) -> str:
    """The source file of module ``name``, found without importing it or its packages (a bad flag
    must answer before megatron-core or torch is imported)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{top} is not installed (needed for {name})")
    path = os.path.join(spec.submodule_search_locations[0], *rest)
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def _check_source(module: str, message: str) -> None:
    from .cpu import CompatError

    with open(_module_file(module), encoding="utf-8") as f:
        if message not in f.read():
            raise CompatError(f"{module} no longer says {message!r}; re-survey sampo_megatron/compat/notices.py")


def quiet_expected_notices() -> None:
    """Install the filters: the loggers' and the Python warnings' (idempotent).

    Raises:
        CompatError: a listed module no longer contains its message (re-survey this file).
    """
    for notice in expected_notices():
        if (notice.logger, notice.message) in _INSTALLED:
            continue
        _check_source(notice.logger, notice.message)
        logging.getLogger(notice.logger).addFilter(_DropNotice(notice.message))
        _INSTALLED.add((notice.logger, notice.message))
    for expected in expected_warnings():
        pattern = re.escape(expected.message)
        # looked up in the filters themselves: whoever resets them (warnings.catch_warnings) drops ours too
        if any(f[0] == "ignore" and f[1] is not None and f[1].pattern == pattern for f in warnings.filters):
            continue
        _check_source(expected.module, expected.message)
        warnings.filterwarnings("ignore", message=pattern)
