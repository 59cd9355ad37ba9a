"""Counter-based 32-bit hashing in int64 torch arithmetic (no overflow, identical on CPU and GPU)."""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for ``0 <= x < 2**32`` held in int64, split so no product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit integers with good avalanche (the "lowbias32" xorshift-multiply finaliser)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_combine(state: torch.Tensor | int, value: torch.Tensor | int) -> torch.Tensor | int:
    """Fold a 64-bit integer field into a 32-bit hash state (low word, then high word).

    With two Python ints it stays in Python ints (the same bits): fields shared by every row are
    folded once instead of once per element.
    """
    if isinstance(state, torch.Tensor):
        value = torch.as_tensor(value, dtype=torch.int64, device=state.device)
    elif isinstance(value, torch.Tensor):
        state = torch.as_tensor(state, dtype=torch.int64, device=value.device)
    state = mix32(state ^ (value & _MASK32))
    return mix32(state ^ ((value >> 32) & _MASK32))
