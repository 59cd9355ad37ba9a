"""PNG figures from ``--metrics-file`` JSONL files, several runs overlaid.

    sampo-plot-metrics --run DPO=runs/dpo/metrics.jsonl --run SamPO=runs/sampo/metrics.jsonl \
        --out-dir figures [--prefix study_] [--title "..."]

Writes ``<prefix>rewards.png``: implicit rewards of chosen (solid) and rejected (dashed) responses
against steps, per run (like Fig. 3 of Lu et al. 2024; the held-out ``eval/rewards_full/*`` of the
verbosity monitor when present, else the training ``rewards_full/*``), and ``<prefix>lengths.png``:
the policy's mean response length (``eval/length_mean``) against steps (like their Fig. 4).
"""

from __future__ import annotations

import argparse
import json
import os

REWARD_SOURCES = ("eval/rewards_full", "rewards_full")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file; a bad line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(iterations, values)`` of the records that have ``key``; a resumed run's repeated
    iterations keep their last value."""
    points = {r["iteration"]: r[key] for r in records if key in r}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _reward_prefix(records: list[dict]) -> str | None:
    for prefix in REWARD_SOURCES:
        if any(f"{prefix}/chosen" in r for r in records):
            return prefix
    return None


def plot_runs(runs: dict[str, list[dict]], out_dir: str, prefix: str = "", title: str = "") -> list[str]:
    """Write the figures; returns their paths (a figure with no data for any run is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    plotted = False
    for i, (name, records) in enumerate(runs.items()):
        source = _reward_prefix(records)
        if source is None:
            continue
        color = colors[i % len(colors)]
        for side, style in (("chosen", "-"), ("rejected", "--")):
            steps, values = series(records, f"{source}/{side}")
            ax.plot(steps, values, style, color=color, label=f"{name} {side}")
        plotted = True
    if plotted:
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set(xlabel="step", ylabel="implicit reward (whole responses)", title=f"{title} implicit rewards".strip())
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}rewards.png")
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    plotted = False
    for i, (name, records) in enumerate(runs.items()):
        steps, values = series(records, "eval/length_mean")
        if steps:
            ax.plot(steps, values, "-o", markersize=3, color=colors[i % len(colors)], label=name)
            plotted = True
    if plotted:
        ax.set(xlabel="step", ylabel="mean response length (tokens)", title=f"{title} response length".strip())
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}lengths.png")
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)
    return written


def parse_runs(specs: list[str]) -> dict[str, list[dict]]:
    runs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--run {spec!r}: expected NAME=METRICS.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--run {name}: metrics file not found: {path}")
        runs[name] = read_metrics(path)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=METRICS.jsonl (repeat for several runs)")
    parser.add_argument("--out-dir", required=True, help="directory for the PNG files")
    parser.add_argument("--prefix", default="", help="file name prefix")
    parser.add_argument("--title", default="", help="figure title prefix")
    args = parser.parse_args(argv)
    for path in plot_runs(parse_runs(args.run), args.out_dir, args.prefix, args.title):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
