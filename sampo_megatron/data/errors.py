"""Bad input records: where they are, why they are bad, and what to do with them.

Every check in the data layer raises :class:`BadRecord`, which names the file, the line (text files)
or row (parquet, ``datasets``), the field and a reason code. :class:`BadRecordLog` applies the
user's ``--on-bad-record`` choice: ``error`` re-raises the first one, ``skip`` counts them by reason
so that a summary can be printed at the end. Either way a bad record never reaches training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

ON_BAD_RECORD = ("error", "skip")

REASONS: dict[str, str] = {
    "malformed_json": "malformed JSON",
    "invalid_utf8": "invalid UTF-8",
    "missing_field": "missing field",
    "wrong_type": "field of the wrong type",
    "empty_response": "empty response (or empty prompt without BOS)",
    "identical_responses": "chosen identical to rejected",
    "mismatched_prompt": "chosen and rejected continue different conversations",
    "no_room_for_response": "prompt leaves no room for a response within --seq-length",
    "token_out_of_vocab": "token id outside the model's vocabulary",
}
"""Reason code -> what the summary calls it."""


@dataclass(frozen=True)
class Location:
    """Where a record came from.

    Lines (JSONL, JSON) are 1-based as in an editor; rows (parquet, ``datasets``) are 0-based as
    in pandas and ``datasets``.
    """

    path: str
    kind: str
    """``"line"`` or ``"row"``."""
    number: int

    def __str__(self) -> str:
        # "file:17" is what editors and compilers print, so a user can jump straight to the line.
        return f"{self.path}:{self.number}" if self.kind == "line" else f"{self.path}: row {self.number}"


class DataError(ValueError):
    """Data the run cannot train on as a whole (too few pairs for a global batch, none left after
    skipping bad records); the message names the file and the numbers."""


class BadRecord(ValueError):
    """A record that must not be trained on.

    Args:
        location: Where the record is (``None`` while a record is checked before its place is known;
            :meth:`at` fills it in).
        reason: A key of :data:`REASONS`.
        detail: Human-readable explanation (without the location).
        field: The offending field, e.g. ``"chosen"`` or ``"prompt[1].content"``, if there is one.
    """

    def __init__(self, location: Location | None, reason: str, detail: str, field: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        self.location = location
        self.reason = reason
        self.detail = detail
        self.field = field
        super().__init__(self._message())

    def _message(self) -> str:
        where = str(self.location) if self.location is not None else "<record>"
        what = f"field '{self.field}' {self.detail}" if self.field else self.detail
        return f"{where}: {what} [{self.reason}]"

    def at(self, location: Location) -> BadRecord:
        """The same error at ``location`` (checks below the reader do not know the file)."""
        return BadRecord(location, self.reason, self.detail, self.field)

    def __reduce__(self):
        # Crosses process boundaries (preprocessing workers); the default would pass only the message.
        return BadRecord, (self.location, self.reason, self.detail, self.field)


class BadRecordLog:
    """Applies ``--on-bad-record`` and keeps the counts.

    Args:
        mode: ``"error"`` (raise the first bad record) or ``"skip"`` (count it and go on).
    """

    def __init__(self, mode: str = "error") -> None:
        if mode not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {mode!r}")
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        """Reason -> message of its first occurrence, so the summary shows an example of each."""

    def handle(self, bad: BadRecord) -> None:
        """Raise ``bad`` (``error``) or record it (``skip``)."""
        if self.mode == "error":
            raise bad
        self.counts[bad.reason] += 1
        self.first.setdefault(bad.reason, str(bad))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """``{"skipped": N, "by_reason": {...}, "examples": {...}}`` for reports."""
        return {
            "skipped": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "examples": dict(sorted(self.first.items())),
        }

    def summary(self, kept: int) -> str:
        """One paragraph for the console: kept pairs and skipped ones by reason, with an example each."""
        if not self.total:
            return f"{kept} pairs, no bad records"
        lines = [f"{kept} pairs kept, {self.total} bad records skipped (--on-bad-record skip):"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count} ({REASONS[reason]}), e.g. {self.first[reason]}")
        return "\n".join(lines)
