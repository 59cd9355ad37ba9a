"""Which megatron-core releases sampo-megatron is tested with, and the start-up check.

Two legs are tested on every change (``.ci/run``, docs/compatibility.md):

- Python 3.11 with megatron-core 0.16.x (the last release line that installs on Python 3.11);
- Python 3.12 with megatron-core 0.19.x (what pip resolves on Python 3.12 and NGC containers).

Every workaround in this package is keyed by one of these release lines (:data:`RELEASE_LINES`).
Outside them, :func:`check_megatron_version` stops with the supported versions and how to install
one; ``SAMPO_ALLOW_UNTESTED_MEGATRON=1`` turns that error into a warning (the nearest tested line's
workarounds are then applied, and each still checks that what it patches exists).

Nothing here imports megatron-core: the version is read from the installed distribution.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from importlib import metadata

ALLOW_UNTESTED_ENV = "SAMPO_ALLOW_UNTESTED_MEGATRON"


@dataclass(frozen=True)
class ReleaseLine:
    """A tested megatron-core release line."""

    name: str
    """Key of the line's workarounds, e.g. ``"0.19"``."""
    minimum: tuple[int, ...]
    """Oldest tested release of the line."""
    below: tuple[int, ...]
    """First release outside the line (the next minor release, untested)."""
    python: str
    """The Python the line is tested on."""

    def contains(self, version: tuple[int, ...]) -> bool:
        return self.minimum <= version < self.below

    @property
    def requirement(self) -> str:
        return f"megatron-core>={_text(self.minimum)},<{_text(self.below)}"


RELEASE_LINES: tuple[ReleaseLine, ...] = (
    ReleaseLine("0.16", (0, 16, 1), (0, 17), "3.11"),
    ReleaseLine("0.19", (0, 19, 2), (0, 20), "3.12"),
)


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is outside every tested release line."""


def _text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.19.2"`` -> ``(0, 19, 2)``; pre-release and local parts (``rc1``, ``+abc``) are dropped.

    Raises:
        ValueError: ``text`` does not start with a numeric release.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def installed_megatron_version() -> str | None:
    """The installed megatron-core's version string, or None when it is not installed."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    """How far apart two releases are: (major difference, minor difference)."""
    a, b = a + (0, 0), b + (0, 0)
    return abs(a[0] - b[0]), abs(a[1] - b[1])


def supported_text() -> str:
    return "; ".join(f"{line.requirement} (tested on Python {line.python})" for line in RELEASE_LINES)


def release_line(version_text: str | None = None, allow_untested: bool | None = None) -> ReleaseLine:
    """The tested release line of megatron-core ``version_text`` (default: the installed one).

    Args:
        version_text: a version string; default the installed distribution's.
        allow_untested: accept a version outside the tested lines with a warning (the nearest
            line is returned); default: the ``SAMPO_ALLOW_UNTESTED_MEGATRON`` environment variable.

    Raises:
        UnsupportedMegatronError: megatron-core is missing, or outside the tested lines and
            untested versions are not allowed.
    """
    if version_text is None:
        version_text = installed_megatron_version()
    if version_text is None:
        raise UnsupportedMegatronError(
            f"megatron-core is not installed. Supported: {supported_text()}. Install with: pip install -e ."
        )
    version = parse_version(version_text)
    for line in RELEASE_LINES:
        if line.contains(version):
            return line
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0")
    nearest = min(RELEASE_LINES, key=lambda line: _distance(line.minimum, version))
    message = (
        f"megatron-core {version_text} is outside the versions sampo-megatron is tested with: "
        f"{supported_text()}. Install a tested one, e.g. pip install '{RELEASE_LINES[-1].requirement}' "
        f"on Python 3.12 or pip install '{RELEASE_LINES[0].requirement}' on Python 3.11"
    )
    if not allow_untested:
        raise UnsupportedMegatronError(
            f"{message}; or set {ALLOW_UNTESTED_ENV}=1 to run anyway with the workarounds of the "
            f"{nearest.name} line (each checks that what it patches exists)."
        )
    warnings.warn(f"{message}. Running anyway ({ALLOW_UNTESTED_ENV} is set) with the {nearest.name} line's workarounds.")
    return nearest
