"""The length-bias study's generated task (examples/length_bias) and the plotting tool."""

from __future__ import annotations

import json

import pytest

# examples/length_bias and tools are on pytest's pythonpath (pyproject.toml).
import task
from assets import write_assets
from plot_metrics import plot_runs, read_metrics, series


def test_quality_checker():
    assert task.is_correct("sort 3 1 4 1 .", "the answer is 1 1 3 4 . i hope this helps .")
    assert not task.is_correct("sort 3 1 4 1 .", "the answer is 1 3 4 . 1 1 3 4 is close .")  # a digit lost
    assert not task.is_correct("sort 3 1 4 1 .", "the answer is 1 1 4 3 .")
    assert not task.is_correct("sort 9 9 9 .", "i hope this helps .")


def test_a_wrong_answer_is_as_long_as_the_right_one():
    import random

    rng = random.Random(0)
    for _ in range(200):
        right = sorted(task.random_list(rng))
        wrong = task.corrupt(right, rng)
        assert len(wrong) == len(right) and 1 <= sum(a != b for a, b in zip(wrong, right)) <= 2


@pytest.mark.parametrize("share", [0.0, 0.3, 0.7, 1.0])
def test_pairs_have_the_asked_length_bias_and_right_vs_wrong_answers(tmp_path, share):
    from sampo_megatron.data import load_tokenizer

    paths = write_assets(str(tmp_path), seed=1, long_chosen_share=share, num_pairs=200, num_sft=50, num_heldout=20)
    tokenizer = load_tokenizer(paths["tokenizer"])
    records = [json.loads(line) for line in open(paths["pairs_all"])]
    longer = 0
    for r in records:
        assert task.is_correct(r["prompt"], r["chosen"]) and not task.is_correct(r["prompt"], r["rejected"])
        chosen, rejected = (len(tokenizer.encode(r[k])) for k in ("chosen", "rejected"))
        assert chosen != rejected  # token lengths always differ, in the direction of the filler counts
        longer += chosen > rejected
    assert longer == round(200 * share)
    for name, want in (("pairs_long", True), ("pairs_short", False)):
        for line in open(paths[name]):
            r = json.loads(line)
            assert (len(tokenizer.encode(r["chosen"])) > len(tokenizer.encode(r["rejected"]))) == want


def test_plots_are_written_from_metrics_files(tmp_path):
    runs = {}
    for name, growth in (("DPO", 1.0), ("SamPO", 0.1)):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"iteration": i, "loss": 0.5, "rewards_full/chosen": 0.1 * i} for i in range(1, 5)]
        rows += [{"iteration": i, "eval/length_mean": 10 + growth * i, "eval/rewards_full/chosen": 0.2 * i,
                  "eval/rewards_full/rejected": -0.2 * i} for i in (0, 2, 4)]  # fmt: skip
        rows.append({"iteration": 4, "eval/length_mean": 99.0})  # a resumed run repeats an iteration: last wins
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = read_metrics(str(path))
    assert series(runs["DPO"], "eval/length_mean") == ([0, 2, 4], [10.0, 12.0, 99.0])
    written = plot_runs(runs, str(tmp_path / "fig"), "x_")
    assert [p.rsplit("/", 1)[1] for p in written] == ["x_rewards.png", "x_lengths.png"]
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
