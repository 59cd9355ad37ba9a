"""The study's markdown report: figures (tools/plot_metrics.py) and a table of what each run ended with."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections import defaultdict

import task
from plot_metrics import plot_runs, read_metrics, series


def generation_quality(path: str) -> dict[int, dict[str, float]]:
    """Per eval iteration: accuracy (first number = the right sum), mean / median length, EOS share."""
    by_iter: dict[int, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_iter[record["iteration"]].append(record)
    return {
        it: {
            "accuracy": statistics.fmean(task.is_correct(r["prompt"], r["response"]) for r in recs),
            "length": statistics.fmean(r["num_tokens"] for r in recs),
            "median": statistics.median(r["num_tokens"] for r in recs),
            "eos": statistics.fmean(r["stopped_at_eos"] for r in recs),
        }
        for it, recs in sorted(by_iter.items())
    }


def _final(records: list[dict], key: str) -> float:
    _, values = series(records, key)
    return values[-1] if values else float("nan")


def _row(name: str, dataset: str, run_dir: str, seconds: float) -> tuple[str, dict]:
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    quality = generation_quality(os.path.join(run_dir, "generations.jsonl"))
    first, last = quality[min(quality)], quality[max(quality)]
    values = {
        "accuracy0": first["accuracy"], "accuracy": last["accuracy"], "length0": first["length"], "length": last["length"],
        "eos": last["eos"], "chosen": _final(records, "eval/rewards_full/chosen"),
        "rejected": _final(records, "eval/rewards_full/rejected"), "margin": _final(records, "eval/rewards_full/margins"),
        "margin_debiased": _final(records, "eval/rewards/margins"), "acc_pairs": _final(records, "eval/rewards_full/accuracies"),
    }  # fmt: skip
    row = (f"| {name} | {dataset} | {values['accuracy']:.1%} ({values['accuracy'] - values['accuracy0']:+.1%}) | "
           f"{values['length']:.1f} ({values['length'] - values['length0']:+.1f}) | {values['eos']:.0%} | "
           f"{values['chosen']:+.2f} | {values['rejected']:+.2f} | {values['margin']:+.2f} | {values['margin_debiased']:+.2f} | "
           f"{values['acc_pairs']:.0%} | {seconds:.0f} |")  # fmt: skip
    return row, values


def _observations(values: dict[str, dict]) -> list[str]:
    lines = []
    for name, v in values.items():
        change = v["length"] - v["length0"]
        lines.append(f"- **{name}**: mean response length {v['length0']:.1f} -> {v['length']:.1f} tokens "
                     f"({change / v['length0']:+.0%}), accuracy {v['accuracy0']:.0%} -> {v['accuracy']:.0%}.")
    for subset in ("long", "short"):
        d, s = values.get(f"DPO {subset}"), values.get(f"SamPO {subset}")
        if d and s:
            lines.append(f"- On the **{subset}** subset DPO moved the length by {d['length'] - d['length0']:+.1f} tokens, "
                         f"SamPO by {s['length'] - s['length0']:+.1f}.")
    return lines


# Written by hand after looking at the committed run (the numbers above it are generated).
DISCUSSION = """\
## Discussion

**What matched the paper.** The *short* subset (chosen always the shorter response) is where the
paper sees DPO collapse, and so did this run: DPO first shortened the answers, then the policy fell
into repetitive text that never reaches EOS (mean length at the 40-token cap, EOS in almost no
generation; see the subsets figure), and both held-out rewards went strongly negative. SamPO on the
same data settled at short, well-formed answers that end with EOS, with accuracy no worse than SFT.
With DPO's summed log-ratios, the shorter chosen response is outweighed by the many tokens of the
longer rejected one: pushing the rejected response's probability down token by token is the easy
way to widen the margin, and it drags every sequence, the chosen ones included, down with it.
SamPO compares equal token counts, so the rejected side has no such extra leverage.

**What did not.** On the mixed set (chosen longer in 70% of the pairs) and on the *long* subset,
SamPO's responses grew about as much as DPO's, and SimPO's and R-DPO's as well. In this toy task
length is the easiest preference signal there is: the right and wrong answers differ in one token,
which the tiny model barely learns to tell apart (accuracy did not improve for any method), while
whether the rejected response stops early is visible in every pair. Down-sampling removes the
*sum-over-more-tokens* advantage of the longer response, but not this token-level correlation: the
shorter response is always kept whole, EOS included, so "stop here" is still the token that
separates chosen from rejected in most pairs, and every method learns to avoid it. The paper's
setting differs: real preference data where length is a weaker, noisier cue than content, and a
policy that can learn the content. A toy task in which quality is as easy to learn as length
(or where the shorter response's EOS is not such a clean signal) would be needed to see SamPO's
advantage on the long/mixed data; this one shows it only where DPO's length bias becomes
destructive (the short subset).

**Quality.** No method raised accuracy above the SFT model's, and SamPO lost more of it than DPO on
the mixed and long data (see the table; on the long subset its whole-response margin stayed near
zero while the down-sampled one grew). Our reading: the only token that carries quality here is
the answer, one token of the response. When the chosen response is the longer one, SamPO keeps
only `T_m` of its tokens, so in many pairs the answer token is not in the sum and the update is
driven by filler and EOS alone; DPO always sees it. With real responses, where quality is spread
over many tokens, dropping a random subset loses far less.

**Learning rate.** A first run of this study at lr 1e-3 wrecked every policy within 10 steps
(repetitive text, accuracy near 0 for several methods, all lengths near the cap), so it compared
nothing; the default is 1e-4. Sampled generations (temperature 1) of a tiny model are noisy:
differences of a point or two in accuracy or length are within run-to-run noise.
"""


def write_report(path: str, sft_dir: str, runs: dict[str, str], data: dict, settings: dict, times: dict, total_s: float) -> str:
    from run import METHODS

    out_dir = os.path.dirname(os.path.abspath(path))
    main = {name: read_metrics(os.path.join(d, "metrics.jsonl")) for name, d in runs.items() if METHODS[name][0] == "pairs_all"}
    subsets = {name: read_metrics(os.path.join(d, "metrics.jsonl")) for name, d in runs.items() if METHODS[name][0] != "pairs_all"}
    figures = plot_runs(main, out_dir, "length_bias_", "mixed set:") + plot_runs(subsets, out_dir, "length_bias_subsets_", "long/short subsets:")
    sft_quality = generation_quality(os.path.join(sft_dir, "generations.jsonl"))
    sft_end = sft_quality[max(sft_quality)]

    pref_times = [times.get(name, 0.0) for name in runs]
    rows, values = [], {}
    for name, run_dir in runs.items():
        row, values[name] = _row(name, METHODS[name][0], run_dir, times.get(name, 0.0))
        rows.append(row)
    lines = [
        "# Length bias: DPO vs SamPO (and SimPO, R-DPO) on a toy task",
        "",
        "Generated by `python examples/length_bias/run.py` (the numbers below are that run's; rerunning it",
        "rewrites this page and its figures). Task, data and model: `examples/length_bias/`.",
        "",
        "## Set-up",
        "",
        "- **Task** (`task.py`): prompts `what is A plus B ?` (A, B in 0-9); a response is",
        "  `the answer is N .` plus 0-4 filler sentences (`i hope this helps .`, ...). **Quality** = the",
        "  first number in the response is A + B; **length** = response tokens (EOS excluded). The two are",
        "  independent by construction.",
        f"- **SFT warm-up** from scratch on {len(open(data['sft']).readlines())} examples, right answer in "
        f"{task.SFT_CORRECT_SHARE:.0%} of them, filler count uniform: {settings['sft_iters']} steps, lr {settings['sft_lr']}.",
        "- **Preference pairs**: chosen = right answer, rejected = wrong answer (off by 1-3), each with its own",
        f"  filler count. Mixed set: chosen longer in {settings['long_chosen_share']:.0%} of the pairs; the *long* /",
        "  *short* subsets: chosen always longer / always shorter (the paper's UltraFeedback long/short split).",
        f"- **Runs** from the same SFT checkpoint (policy and reference): {settings['pref_iters']} steps of 32 pairs,",
        f"  lr {settings['pref_lr']} (cosine), beta 0.1 (SimPO beta 2, gamma 1; R-DPO alpha 0.02).",
        f"- **Monitor** every {settings['eval_interval']} steps: {len(open(data['eval_prompts']).readlines())} sampled generations "
        "(temperature 1, seeded, at most 40 new tokens) over all 100 prompts; implicit rewards on "
        f"{len(open(data['heldout']).readlines())} held-out pairs (`eval/rewards_full/*`: whole responses, "
        "`eval/rewards/*`: the run's own length debiasing).",
        "- Model: Llama-style, 2 layers, hidden 64, vocabulary "
        f"{json.load(open(os.path.join(data['tokenizer'], 'tokenizer.json')))['model']['vocab'].__len__()} words, sequences of 48 tokens.",
        f"- Machine: {os.cpu_count()} CPU cores, Python {platform.python_version()}; whole study {total_s / 60:.1f} min wall time "
        f"(SFT {times.get('SFT', 0.0):.0f} s, preference runs {min(pref_times):.0f}-{max(pref_times):.0f} s each"
        f"{'; the slow ones shared the CPU with other jobs' if max(pref_times) > 2 * min(pref_times) else ''}).",
        "",
        f"SFT model at the end of warm-up: accuracy {sft_end['accuracy']:.1%}, mean length {sft_end['length']:.1f} tokens, "
        f"EOS reached in {sft_end['eos']:.0%} of the generations.",
        "",
        "## Results (end of training; in brackets: change from the SFT starting point)",
        "",
        "| method | data | accuracy | mean length | ended by EOS | reward chosen | reward rejected | margin | margin (debiased) | pair acc. | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Rewards: held-out implicit rewards `beta * log(pi/pi_ref)` summed over whole responses (SimPO: its own",
        "`beta * mean log pi`); *margin (debiased)* uses the run's length debiasing (SamPO: down-sampled).",
        "*Pair acc.*: share of held-out pairs whose chosen reward is above the rejected one.",
        "",
        "## Figures",
        "",
        *[f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures],
        "",
        "## What happened",
        "",
        *_observations(values),
        "",
        DISCUSSION,
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
