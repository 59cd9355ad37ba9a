"""The verbosity monitor (training/monitor.py) in a real TP=2 training run.

Checks: eval metrics appear exactly at the eval interval (and at step 0); the logged lengths are the
lengths of the generations it wrote; its greedy generations at the last step equal tools/generate.py
on the checkpoint saved at that step (the monitor and the tool share one generation module); the
held-out rewards are zero while the policy is the reference and move once it trains.
"""

from __future__ import annotations

import json
import statistics

import pytest

from helpers import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

PROMPTS = ["What is the opposite of fast?", "Please answer briefly. What is nine times four?", "Name a colour."]


def test_monitor_logs_lengths_and_rewards_at_the_interval(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    held_out = tmp_path / "held_out.jsonl"
    lines = (REPO_ROOT / "examples" / "data" / "tiny_pairs.jsonl").read_text().splitlines()
    held_out.write_text("\n".join(lines[-8:]) + "\n")
    metrics, generations, save = tmp_path / "metrics.jsonl", tmp_path / "generations.jsonl", tmp_path / "ckpt"
    run_torchrun(REPO_ROOT / "launch" / "pretrain_sampo.py", 2, "--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"),
                 "--train-iters", "4", "--save", str(save), "--save-interval", "100", "--metrics-file", str(metrics),
                 "--eval-interval", "2", "--eval-prompts", str(prompts), "--eval-data-path", str(held_out),
                 "--eval-output", str(generations), "--eval-rewards-output", str(tmp_path / "rewards.jsonl"),
                 "--eval-max-new-tokens", "6", "--lr", "0.01")  # fmt: skip
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = {r["iteration"]: r for r in records if "eval/length_mean" in r}
    assert sorted(evals) == [0, 2, 4]
    assert all("eval/rewards_full/margins" in r for r in evals.values())
    assert {r["iteration"] for r in records if "loss" in r} == {1, 2, 3, 4}

    written = [json.loads(line) for line in generations.read_text().splitlines()]
    for iteration, record in evals.items():
        lengths = [g["num_tokens"] for g in written if g["iteration"] == iteration]
        assert len(lengths) == len(PROMPTS)
        assert record["eval/length_mean"] == statistics.fmean(lengths)
        assert record["eval/length_median"] == statistics.median(lengths)

    # Policy == reference before the first step: every implicit reward is exactly zero.
    assert all(evals[0][f"eval/{p}/{side}"] == 0.0 for p in ("rewards", "rewards_full") for side in ("chosen", "rejected"))
    assert evals[4]["eval/rewards_full/chosen"] != 0.0 and evals[4]["eval/rewards_full/rejected"] != 0.0
    # --eval-rewards-output: every held-out pair at every evaluation; its means are the logged metrics
    pair_rewards = [json.loads(line) for line in (tmp_path / "rewards.jsonl").read_text().splitlines()]
    for iteration, record in evals.items():
        rows = [r for r in pair_rewards if r["iteration"] == iteration]
        assert [r["index"] for r in rows] == list(range(len(lines[-8:])))
        for name in ("rewards/margins", "rewards_full/chosen", "rewards_full/rejected", "rewards_full/margins"):
            assert statistics.fmean(r[name] for r in rows) == pytest.approx(record[f"eval/{name}"], rel=1e-9, abs=1e-12)
        assert all(r["rewards_full/margins"] == pytest.approx(r["rewards_full/chosen"] - r["rewards_full/rejected"], abs=1e-6)
                   for r in rows)  # fmt: skip
    # the long/short view (its values against float64: tests/test_evaluation.py)
    held_out_pairs = [json.loads(line) for line in lines[-8:]]
    assert evals[0]["eval/pairs_chosen_longer"] + evals[0]["eval/pairs_chosen_shorter"] <= len(held_out_pairs)
    for p in ("rewards", "rewards_full"):
        assert f"eval/{p}/margin_length_corr" not in evals[0]  # all margins 0: undefined, left out
        assert -1.0 <= evals[4][f"eval/{p}/margin_length_corr"] <= 1.0
        for group in ("chosen_longer", "chosen_shorter"):
            if evals[0][f"eval/pairs_{group}"]:
                assert evals[0][f"eval/{p}/accuracies_{group}"] == 0.0 and evals[0][f"eval/{p}/margins_{group}"] == 0.0
                assert 0.0 <= evals[4][f"eval/{p}/accuracies_{group}"] <= 1.0

    out = tmp_path / "generate.jsonl"
    run_torchrun(REPO_ROOT / "tools" / "generate.py", 1, "--load", str(save), "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "6", "--seq-length", "128")  # fmt: skip
    tool = [json.loads(line) for line in out.read_text().splitlines()]
    monitor = [g for g in written if g["iteration"] == 4]
    assert [(g["response"], g["num_tokens"]) for g in monitor] == [(g["response"], g["num_tokens"]) for g in tool]
