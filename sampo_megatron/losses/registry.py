"""Name -> implementation registries, so each variant is a few registered lines, not an if-chain."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of implementations with a helpful error for unknown names."""

    def __init__(self, kind: str, names: tuple[str, ...]) -> None:
        """``names``: the names it will hold, as losses/names.py lists them."""
        self.kind = kind
        self.listed = names
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name not in self.listed:
            raise ValueError(f"{self.kind} {name!r} is not listed in sampo_megatron/losses/names.py (add it there)")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def check_complete(self) -> None:
        """Every listed name is registered (called after the last registration)."""
        missing = sorted(set(self.listed) - set(self._entries))
        if missing:
            raise ValueError(f"{self.kind}: {missing} listed in sampo_megatron/losses/names.py but never registered")
