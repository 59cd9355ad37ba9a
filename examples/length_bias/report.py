"""The study's markdown report: tables with a 95% interval over seeds, curves with bands, and the
held-out reward margin against the length difference (examples/length_bias/run.py writes the runs).

Every number of a method x data set is the mean over its seeds with a 95% Student-t interval
``mean +- t(0.975, n-1) * sd / sqrt(n)``; a change ("from SFT") is computed per seed against that
run's own evaluation at step 0 (the SFT model, sampled with the run's seed) before averaging.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections import defaultdict

from sampo_megatron.cli.plot_metrics import read_metrics

import task

# t(0.975, df) for df = 1..30; beyond, the normal quantile (within 4%).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
MARGIN_METHODS = ("DPO", "SamPO", "SamPO (independent)", "SamPO-TopK", "Iterative SamPO", "R-DPO", "LD-DPO", "TDPO2")
"""The binned margin plot's methods: those whose rewards are ``beta * log(pi/pi_ref)`` sums at beta
0.1 (one scale); every method's correlation is in the table."""
BINS = ((-99, -15), (-15, -8), (-8, -1), (1, 8), (8, 15), (15, 99))
"""Length-difference bins ``T_w - T_l`` (tokens, [lo, hi)) of the binned margin plot (never 0: the
task's pairs always differ in length)."""


def interval(values: list[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95% t-interval over ``values`` (half-width NaN for one value)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
    mean, half = interval(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:{'+' if sign else ''}.{digits}f} ± {half * scale:.{digits}f}"


def by_iteration(path: str) -> dict[int, list[dict]]:
    """The records of a monitor JSONL file (--eval-output, --eval-rewards-output) by iteration."""
    by_iter: dict[int, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_iter[record["iteration"]].append(record)
    return by_iter


def generation_quality(path: str) -> dict[int, dict[str, float]]:
    """Per eval iteration: accuracy (the sorted list before the first '.'), mean length, EOS share."""
    return {
        it: {
            "accuracy": statistics.fmean(task.is_correct(r["prompt"], r["response"]) for r in recs),
            "length": statistics.fmean(r["num_tokens"] for r in recs),
            "eos": statistics.fmean(r["stopped_at_eos"] for r in recs),
        }
        for it, recs in sorted(by_iteration(path).items())
    }


class Run:
    """What one run ended with (and started from), read from its directory."""

    def __init__(self, method: str, subset: str, seed: int, run_dir: str) -> None:
        self.method, self.subset, self.seed = method, subset, seed
        self.quality = generation_quality(os.path.join(run_dir, "generations.jsonl"))
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        self.evals = {r["iteration"]: r for r in records if "eval/rewards_full/margins" in r}
        self.pairs = by_iteration(os.path.join(run_dir, "pair_rewards.jsonl"))
        self.last = max(self.quality)
        self.wall_s = float(open(os.path.join(run_dir, "wall_s.txt")).read())

    def final(self, key: str) -> float:
        return self.quality[self.last][key]

    def change(self, key: str) -> float:
        return self.quality[self.last][key] - self.quality[0][key]

    def eval_metric(self, key: str) -> float:
        return float(self.evals[self.last].get(key, math.nan))


def _group(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.subset)].append(run)
    return groups


def _plot_curves(groups, methods, subsets, out_dir: str) -> list[str]:
    """Accuracy and mean generated length against steps, one figure per data set (Figs. 3-4 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    written = []
    for subset in subsets:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for i, method in enumerate(methods):
            runs = groups[(method, subset)]
            steps = sorted(runs[0].quality)
            for ax, key, scale in ((axes[0], "accuracy", 100.0), (axes[1], "length", 1.0)):
                stats = [interval([r.quality[s][key] * scale for r in runs if s in r.quality]) for s in steps]
                mean = [m for m, _ in stats]
                half = [0.0 if math.isnan(h) else h for _, h in stats]
                ax.plot(steps, mean, color=colors[i % len(colors)], label=method, lw=1.5)
                ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                                color=colors[i % len(colors)], alpha=0.12)  # fmt: skip
        axes[0].set(xlabel="step", ylabel="accuracy of sampled answers (%)", title=f"{subset} set: accuracy")
        axes[1].set(xlabel="step", ylabel="mean generated length (tokens)", title=f"{subset} set: length")
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"length_bias_curves_{subset}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def binned_margins(runs: list[Run], key: str) -> list[tuple[float, float]]:
    """Per length-difference bin: the mean held-out margin ``key`` at the last step, as an interval
    over seeds of each seed's bin mean."""
    out = []
    for lo, hi in BINS:
        per_seed = []
        for run in runs:
            values = [p[key] for p in run.pairs[run.last] if lo <= p["lengths/chosen"] - p["lengths/rejected"] < hi]
            if values:
                per_seed.append(statistics.fmean(values))
        out.append(interval(per_seed))
    return out


def _plot_margins(groups, methods, subset: str, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    centers = [(max(lo, -20) + min(hi, 20)) / 2 for lo, hi in BINS]
    for ax, key, title in ((axes[0], "rewards_full/margins", "whole responses: beta * sum log(pi/pi_ref)"),
                           (axes[1], "rewards/margins", "the method's own (debiased) reward")):  # fmt: skip
        for i, method in enumerate(methods):
            stats = binned_margins(groups[(method, subset)], key)
            ax.errorbar([c + 0.15 * (i - len(methods) / 2) for c in centers], [m for m, _ in stats],
                        yerr=[0.0 if math.isnan(h) else h for _, h in stats], color=colors[i % len(colors)],
                        label=method, marker="o", ms=3, lw=1, capsize=2)  # fmt: skip
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set(xlabel="length difference T_w - T_l (tokens, binned)", ylabel="held-out reward margin", title=title)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, f"length_bias_margin_vs_length_{subset}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _generation_rows(groups, methods, subsets) -> list[str]:
    rows = []
    for subset in subsets:
        for method in methods:
            runs = groups[(method, subset)]
            rows.append(
                f"| {method} | {subset} | {len(runs)} | {fmt([r.final('accuracy') for r in runs], 100)} | "
                f"{fmt([r.change('accuracy') for r in runs], 100, sign=True)} | {fmt([r.final('length') for r in runs])} | "
                f"{fmt([r.change('length') for r in runs], sign=True)} | {fmt([r.final('eos') for r in runs], 100, 0)} |"
            )
    return rows


def _held_out_rows(groups, methods, subsets) -> list[str]:
    rows = []
    for subset in subsets:
        for method in methods:
            runs = groups[(method, subset)]

            def col(key: str, scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
                return fmt([r.eval_metric(key) for r in runs], scale, digits, sign)

            rows.append(
                f"| {method} | {subset} | {col('eval/rewards/accuracies_chosen_longer', 100, 0)} | "
                f"{col('eval/rewards/accuracies_chosen_shorter', 100, 0)} | {col('eval/rewards/margin_length_corr', sign=True)} | "
                f"{col('eval/rewards_full/margin_length_corr', sign=True)} | {col('eval/rewards_full/margins', sign=True)} |"
            )
    return rows


def comparisons(groups, methods, subsets) -> list[str]:
    """Each method against DPO on the same data and seeds: the per-seed difference of the final
    accuracy and length, with its interval; listed where the interval excludes 0."""
    lines = []
    for subset in subsets:
        base = {r.seed: r for r in groups.get(("DPO", subset), [])}
        for method in methods:
            if method == "DPO" or not base:
                continue
            runs = [r for r in groups[(method, subset)] if r.seed in base]
            for key, scale, unit in (("accuracy", 100.0, " points"), ("length", 1.0, " tokens")):
                diffs = [(r.final(key) - base[r.seed].final(key)) * scale for r in runs]
                mean, half = interval(diffs)
                if not math.isnan(half) and abs(mean) > half:
                    lines.append(f"- {subset} set: {method}'s final {key} is {mean:+.1f} ± {half:.1f}{unit} from DPO's.")
    return lines or ["- No method's final accuracy or length differs from DPO's by more than the interval."]


def accuracy_change_summary(groups, methods, subsets) -> str:
    """How many method x data set changed accuracy from SFT by more than their interval, naming the others."""
    inside = []
    for subset in subsets:
        for method in methods:
            mean, half = interval([r.change("accuracy") * 100 for r in groups[(method, subset)]])
            if math.isnan(half) or abs(mean) <= half:
                inside.append(f"{method} on {subset} ({mean:+.1f} ± {half:.1f})")
    total = len(methods) * len(subsets)
    text = f"The accuracy change from SFT exceeds its 95% interval for {total - len(inside)} of the {total} method x data set runs"
    return text + (f"; not for {'; '.join(inside)}." if inside else ".")


def write_report(path: str, sft_dir: str, run_specs: list[tuple], data: dict, settings: dict, total_s: float) -> str:
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    runs = [Run(*spec) for spec in run_specs]
    groups = _group(runs)
    methods = list(dict.fromkeys(r.method for r in runs))
    subsets = list(dict.fromkeys(r.subset for r in runs))
    figures = _plot_curves(groups, methods, subsets, out_dir)
    margin_methods = [m for m in methods if m in MARGIN_METHODS]
    figures += [_plot_margins(groups, margin_methods, subset, out_dir) for subset in subsets]

    sft_quality = generation_quality(os.path.join(sft_dir, "generations.jsonl"))
    sft_end = sft_quality[max(sft_quality)]
    step0 = {r.seed: r.quality[0] for r in runs}  # the SFT model sampled with each seed
    sft_acc = fmt([q["accuracy"] for q in step0.values()], 100)
    sft_len = fmt([q["length"] for q in step0.values()])
    seeds = sorted({r.seed for r in runs})
    pref = settings["pref_s"]
    n_heldout = len(open(data["heldout"]).readlines())
    n_prompts = len(open(data["eval_prompts"]).readlines())
    vocab = len(json.load(open(os.path.join(data["tokenizer"], "tokenizer.json")))["model"]["vocab"])
    flags = "\n".join(f"| {m} | `{' '.join(settings['methods'][m])}` |" for m in methods)
    lines = [
        "# Length bias: DPO, SamPO and the other length fixes on a learnable toy task",
        "",
        "Generated by `python examples/length_bias/run.py` (`make length-bias`); the numbers and figures are that",
        "run's, and rerunning it rewrites this page. Task, data and model: `examples/length_bias/`.",
        "",
        "## Set-up",
        "",
        "- **Task** (`task.py`): prompts `sort 3 1 4 1 .` (3-5 digits); a response is `the answer is 1 1 3 4 .`",
        f"  plus 0-{task.MAX_FILLER} filler sentences (`i hope this helps .`, ...). **Quality** = the digits before the first",
        "  `.` are the prompt's list sorted; a wrong answer has one or two digits changed, so it is exactly as long.",
        "  **Length** = response tokens (EOS excluded), set by the filler. The two are independent by construction.",
        f"- **SFT warm-up** from scratch on {len(open(data['sft']).readlines())} examples, the right answer in "
        f"{task.SFT_CORRECT_SHARE:.0%} of them, filler count uniform: {settings['sft_iters']} steps, lr {settings['sft_lr']}.",
        "- **Preference pairs**: chosen = right answer, rejected = a wrong one, each with its own filler count.",
        f"  *mixed*: chosen longer in {settings['long_chosen_share']:.0%} of the pairs; *long* / *short*: chosen always",
        "  longer / always shorter (the paper's UltraFeedback long/short split). 1024 pairs each.",
        f"- **Runs**: every method below x every data set x {len(seeds)} seeds (seeds {', '.join(map(str, seeds))}: data order,",
        f"  SamPO's draws, the monitor's sampling), each from the same SFT checkpoint (policy and reference): "
        f"{settings['pref_iters']} steps of 32 pairs, lr {settings['pref_lr']} (cosine to a tenth).",
        f"- **Monitor** every {settings['eval_interval']} steps and at step 0: {n_prompts} sampled generations (temperature 1,",
        f"  at most 48 new tokens) on {n_prompts // 2} held-out prompts, each twice; implicit rewards of {n_heldout} held-out pairs",
        "  (chosen longer in the mixed share), per pair (`--eval-rewards-output`). Held out: no list, in any order, that the",
        "  SFT or preference data asks for.",
        f"- Model: Llama-style, 2 layers, hidden 64, vocabulary {vocab} words, sequences of 64 tokens.",
        f"- Machine: {os.cpu_count()} CPU cores, Python {platform.python_version()}, {settings['jobs']} runs side by side "
        f"(one thread each). Whole study **{total_s / 60:.1f} min** wall time (SFT {settings['sft_s']:.0f} s; "
        f"{len(pref)} preference runs of {min(pref):.0f}-{max(pref):.0f} s).",
        "",
        "| method | flags |",
        "|---|---|",
        flags,
        "",
        "**Intervals.** Every `a ± b` is the mean over seeds and the half-width of its 95% t-interval "
        f"(t(0.975, {len(seeds) - 1}) = {_T975[len(seeds) - 2]:.2f} for {len(seeds)} seeds). A change is computed per seed "
        "against the run's own step-0 evaluation (the SFT model, sampled with that seed).",
        "",
        f"**SFT model** (step-0 evaluations over seeds): accuracy {sft_acc} %, mean length {sft_len} tokens; at the end of its",
        f"own warm-up run: accuracy {sft_end['accuracy']:.1%}, EOS in {sft_end['eos']:.0%} of the generations.",
        "",
        "## Generations (end of training)",
        "",
        "| method | data | seeds | accuracy % | change % points | mean length | change (tokens) | ended by EOS % |",
        "|---|---|---|---|---|---|---|---|",
        *_generation_rows(groups, methods, subsets),
        "",
        accuracy_change_summary(groups, methods, subsets),
        "",
        "## Held-out pairs (end of training): accuracy by length, and the reward-length relation",
        "",
        "| method | data | pair acc., chosen longer % | pair acc., chosen shorter % | corr(margin, T_w - T_l), own reward | "
        "corr, whole-response reward | mean whole-response margin |",
        "|---|---|---|---|---|---|---|",
        *_held_out_rows(groups, methods, subsets),
        "",
        "*Own reward*: the margin the method optimises (SamPO: the down-sampled sums; SimPO, LN-DPO, SANorm: their",
        "normalised rewards; TDPO: DPO's `beta R`, as the monitor reports it). *Whole-response*: `beta * sum log(pi/pi_ref)`",
        "over every token (SimPO and ORPO have no reference: their rewards are their own policy-only ones, not comparable).",
        "*Corr*: Pearson's correlation over the held-out pairs of the margin and the length difference `T_w - T_l`.",
        "",
        "## Differences from DPO (same data and seeds; listed where the interval excludes 0)",
        "",
        *comparisons(groups, methods, subsets),
        "",
        "## Figures",
        "",
        "Curves: mean over seeds, band = 95% interval. Margin plots: held-out pairs at the last step, binned by length",
        "difference; the point is the mean over seeds of each seed's bin mean, the bar its 95% interval (methods whose",
        "rewards are `beta * log(pi/pi_ref)` sums at beta 0.1, one scale).",
        "",
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures],
        "",
    ]
    discussion = os.path.join(os.path.dirname(os.path.abspath(__file__)), "discussion.md")
    if os.path.isfile(discussion) and not settings.get("quick"):
        lines += [open(discussion, encoding="utf-8").read().rstrip(), ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
