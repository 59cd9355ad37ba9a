"""Configuration sections that can be frozen: once a run's plan is resolved (sampo_megatron/plan.py),
assigning to any of its fields raises, so nothing downstream can change what was decided."""

from __future__ import annotations

import copy
import dataclasses


class Freezable:
    """A dataclass mixin: :func:`frozen_copy` returns an instance whose fields cannot be assigned.

    ``dataclasses.replace`` on a frozen instance gives a new, unfrozen one (a variant, not a change).
    """

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign {type(self).__name__}.{name}: the run's resolved plan is frozen "
                "(sampo_megatron/plan.py); build a new configuration with dataclasses.replace"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(f"cannot delete {type(self).__name__}.{name}: the run's resolved plan is frozen")
        object.__delattr__(self, name)


def frozen_copy(value):
    """A deep copy of ``value`` (a dataclass of :class:`Freezable` sections) with every Freezable in it frozen."""
    value = copy.deepcopy(value)
    _freeze(value)
    return value


def _freeze(value) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _freeze(getattr(value, f.name))
        if isinstance(value, Freezable):
            value.__dict__["_frozen"] = True
