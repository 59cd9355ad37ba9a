"""megatron-core's asynchronous torch_dist save, asked for the same way on 0.16 and 0.19.

0.19 gave ``dist_checkpointing.save`` an ``async_strategy`` argument whose default, ``"nvrx"``,
needs nvidia-resiliency-ext (not a dependency of this project); ``"mcore"`` is megatron-core's own
implementation, the one 0.16 runs without being asked (megatron-core 0.19 logs that it is
deprecated). Both return an ``AsyncRequest`` for
``dist_checkpointing.strategies.async_utils.AsyncCallsQueue``.
"""

from __future__ import annotations

import inspect

from .version import release_line


def async_save_kwargs() -> dict:
    """Keyword arguments of ``dist_checkpointing.save`` that select megatron-core's own async save.

    Raises:
        CompatError: the installed 0.19 release has no ``async_strategy`` argument (re-survey).
    """
    if release_line().name == "0.16":
        return {}
    from megatron.core import dist_checkpointing

    from .cpu import CompatError

    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters:
        raise CompatError(
            "megatron-core 0.19: dist_checkpointing.save has no async_strategy argument (expected at serialization.py:359); "
            "re-survey sampo_megatron/compat/async_save.py"
        )
    return {"async_strategy": "mcore"}
