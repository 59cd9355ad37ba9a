"""Token-length statistics of a preference set, as JSON and as a PNG histogram.

The numbers that matter for length bias: how long chosen (T_w) and rejected (T_l) responses are,
and how often the chosen one is longer. T counts the response tokens as trained (EOS included),
before truncation; with a ``seq_length`` the truncated means are reported as well.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np

from .pairs import EncodedPair, truncation_plan

FIELDS = ("prompt", "chosen", "rejected")


class LengthStats:
    """Collects the token lengths of encoded pairs."""

    def __init__(self) -> None:
        self._lengths: list[tuple[int, int, int, int, int]] = []

    def add(self, pair: EncodedPair) -> None:
        self._lengths.append(
            (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids), pair.keep_prefix, pair.keep_suffix)
        )

    def extend(self, pairs: Iterable[EncodedPair]) -> None:
        for p in pairs:
            self.add(p)

    def __len__(self) -> int:
        return len(self._lengths)

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"prompt", "chosen", "rejected"}`` -> int64 lengths."""
        a = np.asarray(self._lengths, dtype=np.int64).reshape(-1, 5)
        return {f: a[:, i] for i, f in enumerate(FIELDS)}

    def report(self, seq_length: int | None = None, bins: int = 40) -> dict:
        """The statistics as a JSON-ready dict (see module docstring)."""
        n = len(self)
        if n == 0:
            return {"num_pairs": 0}
        a = self.arrays()
        t_w, t_l = a["chosen"], a["rejected"]
        top = int(max(v.max() for v in a.values()))
        edges = np.linspace(0, top + 1, bins + 1).round().astype(np.int64)
        edges = np.unique(edges)
        out = {
            "num_pairs": n,
            "tokens": {f: _summary(v) for f, v in a.items()},
            "chosen_longer_share": float((t_w > t_l).mean()),
            "rejected_longer_share": float((t_w < t_l).mean()),
            "tie_share": float((t_w == t_l).mean()),
            "mean_T_w": float(t_w.mean()),
            "mean_T_l": float(t_l.mean()),
            "length_difference_T_w_minus_T_l": _summary(t_w - t_l),
            "histogram": {"edges": edges.tolist(), **{f: np.histogram(v, edges)[0].tolist() for f, v in a.items()}},
        }
        if seq_length is not None:
            plans = np.array([truncation_plan(p, c, r, seq_length, kp, ks) for p, c, r, kp, ks in self._lengths])
            out["truncated_to_seq_length"] = {
                "seq_length": seq_length,
                "mean_T_w": float(np.maximum(plans[:, 1], 0).mean()),
                "mean_T_l": float(np.maximum(plans[:, 2], 0).mean()),
                "pairs_with_prompt_cut": int((plans[:, 0] < a["prompt"]).sum()),
                "pairs_with_response_cut": int(((plans[:, 1] < t_w) | (plans[:, 2] < t_l)).sum()),
            }
        return out


def _summary(v: np.ndarray) -> dict:
    q = np.percentile(v, [50, 90, 99])
    return {"min": int(v.min()), "max": int(v.max()), "mean": float(v.mean()), "median": float(q[0]),
            "p90": float(q[1]), "p99": float(q[2]), "total": int(v.sum())}  # fmt: skip


def write_report(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")


def write_histogram_png(stats: LengthStats, path: str, title: str) -> bool:
    """Histograms of prompt / chosen / rejected lengths and of T_w - T_l, as a PNG.

    Returns:
        False (and writes nothing) when matplotlib is not installed (``pip install
        'sampo-megatron[data]'``) or there are no pairs.
    """
    if not len(stats):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must come before pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    a = stats.arrays()
    report = stats.report()
    edges = report["histogram"]["edges"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for field, colour in zip(FIELDS, ("tab:gray", "tab:green", "tab:red")):
        left.hist(a[field], bins=edges, histtype="step", linewidth=1.5, color=colour,
                  label=f"{field} (mean {a[field].mean():.1f})")  # fmt: skip
    left.set_xlabel("tokens")
    left.set_ylabel("pairs")
    left.set_title("token lengths (responses include EOS)")
    left.legend()
    diff = a["chosen"] - a["rejected"]
    span = max(1, int(np.abs(diff).max()))
    right.hist(diff, bins=np.linspace(-span - 0.5, span + 0.5, min(2 * span + 2, 61)), color="tab:blue")
    right.axvline(0, color="black", linewidth=1)
    right.set_xlabel("T_w - T_l (chosen minus rejected tokens)")
    right.set_title(f"chosen longer in {report['chosen_longer_share']:.1%} of {len(stats)} pairs")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
