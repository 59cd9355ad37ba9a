"""Length statistics of generated responses, and the difference between two sets with an interval.

The number users look at after a SamPO run is how long the responses got: the mean and its spread,
and against a baseline (the SFT model, a DPO run) the difference with an interval, so that a change
of a few tokens can be told from noise. Intervals are percentile bootstrap intervals (numpy only,
fixed seed: the same files give the same numbers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (10, 25, 50, 75, 90, 95)
BOOTSTRAP_RESAMPLES = 10_000


@dataclass
class LengthStats:
    """Summary of one set of response lengths (tokens)."""

    count: int
    mean: float
    std: float
    """Sample standard deviation (``ddof=1``; 0 for a single response)."""
    median: float
    percentiles: dict[str, float]
    """``p10`` ... ``p95`` (numpy's linear interpolation)."""
    minimum: int
    maximum: int
    eos_share: float | None
    """Share of responses that ended with EOS (the rest hit the token limit); None when unknown."""

    def to_dict(self) -> dict:
        return asdict(self)


def length_stats(lengths: list[int], stopped_at_eos: list[bool] | None = None) -> LengthStats:
    """Summarise ``lengths``; ``stopped_at_eos`` (same order) gives the EOS share."""
    if not lengths:
        raise ValueError("no responses to summarise")
    values = np.asarray(lengths, dtype=np.float64)
    return LengthStats(
        count=len(values),
        mean=float(values.mean()),
        std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        median=float(np.median(values)),
        percentiles={f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES},
        minimum=int(values.min()),
        maximum=int(values.max()),
        eos_share=None if stopped_at_eos is None else float(np.mean(stopped_at_eos)),
    )


def length_difference(lengths: list[int], baseline: list[int], *, paired: bool, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, float | bool | int]:  # fmt: skip
    """Mean length of ``lengths`` minus that of ``baseline``, with a bootstrap interval.

    Args:
        paired: the two lists answer the same prompts in the same order: resample prompts and take
            the per-prompt differences (a much tighter interval than two independent samples).
        confidence: the interval's coverage.
        seed: of the resampling.

    Returns:
        ``difference``, ``low``, ``high``, ``relative`` (difference / baseline mean), ``paired``,
        ``resamples``.
    """
    a, b = np.asarray(lengths, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError("both sets need responses")
    if paired and len(a) != len(b):
        raise ValueError(f"paired sets must have the same size, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    if paired:
        diffs = a - b
        samples = diffs[rng.integers(0, len(diffs), size=(BOOTSTRAP_RESAMPLES, len(diffs)))].mean(axis=1)
    else:
        samples = (a[rng.integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))].mean(axis=1)
                   - b[rng.integers(0, len(b), size=(BOOTSTRAP_RESAMPLES, len(b)))].mean(axis=1))  # fmt: skip
    tail = 100 * (1 - confidence) / 2
    difference = float(a.mean() - b.mean())
    return {
        "difference": difference,
        "low": float(np.percentile(samples, tail)),
        "high": float(np.percentile(samples, 100 - tail)),
        "relative": difference / float(b.mean()) if b.mean() else None,
        "paired": paired,
        "resamples": BOOTSTRAP_RESAMPLES,
    }
