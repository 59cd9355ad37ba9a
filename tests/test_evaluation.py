"""Evaluation without a model (sampo_megatron/evaluation): tools/length_report.py's statistics
against the statistics module and written-out percentiles, its bootstrap interval against the
normal approximation, every input format; the length-stratified held-out metrics against a
float64 computation written out pair by pair."""

import json
import math
import random
import statistics

import pytest

from sampo_megatron.cli.length_report import GenerationsFileError, main, read_generations
from sampo_megatron.evaluation import length_difference, length_stats, length_stratified

from helpers import TOKENIZER


def percentile(values, q):
    """Linear interpolation between closest ranks, written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_stats_equal_a_written_out_computation():
    rng = random.Random(1)
    lengths = [rng.randint(1, 400) for _ in range(101)]
    eos = [rng.random() < 0.8 for _ in lengths]
    stats = length_stats(lengths, eos)
    assert stats.count == 101 and stats.minimum == min(lengths) and stats.maximum == max(lengths)
    assert stats.mean == pytest.approx(sum(lengths) / len(lengths), rel=1e-12)
    assert stats.std == pytest.approx(statistics.stdev(lengths), rel=1e-12)
    assert stats.median == statistics.median(lengths)
    for q in (10, 25, 50, 75, 90, 95):
        assert stats.percentiles[f"p{q}"] == pytest.approx(percentile(lengths, q), rel=1e-12)
    assert stats.eos_share == sum(eos) / len(eos)
    assert length_stats([7]).std == 0.0 and length_stats([7]).eos_share is None


def test_paired_interval_is_exact_for_a_constant_shift_and_normal_for_noise():
    base = [10, 50, 200, 30, 80]
    shifted = length_difference([x + 3 for x in base], base, paired=True)
    assert (shifted["difference"], shifted["low"], shifted["high"]) == (3.0, 3.0, 3.0)
    rng = random.Random(2)
    baseline = [rng.randint(20, 300) for _ in range(400)]
    noise = [rng.gauss(5, 20) for _ in baseline]
    lengths = [max(1, round(b + n)) for b, n in zip(baseline, noise)]
    diffs = [a - b for a, b in zip(lengths, baseline)]
    diff = length_difference(lengths, baseline, paired=True)
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert diff["difference"] == pytest.approx(statistics.fmean(diffs), rel=1e-12)
    assert diff["high"] - diff["low"] == pytest.approx(2 * half, rel=0.1)
    assert diff["low"] < statistics.fmean(diffs) < diff["high"]
    assert diff == length_difference(lengths, baseline, paired=True)  # the same numbers every time


def test_unpaired_interval_follows_both_samples():
    rng = random.Random(3)
    a = [rng.randint(50, 150) for _ in range(300)]
    b = [rng.randint(40, 120) for _ in range(200)]
    diff = length_difference(a, b, paired=False)
    half = 1.96 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    assert diff["difference"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b), rel=1e-12)
    assert diff["high"] - diff["low"] == pytest.approx(2 * half, rel=0.1)
    assert diff["relative"] == pytest.approx(diff["difference"] / statistics.fmean(b), rel=1e-12)
    with pytest.raises(ValueError, match="same size"):
        length_difference(a, b, paired=True)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reads_generate_monitor_and_alpaca_eval_files(tmp_path):
    plain = _write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "a", "response": "x", "num_tokens": 4, "stopped_at_eos": True},
                                                  {"prompt": "b", "response": "y", "num_tokens": 9, "stopped_at_eos": False}])  # fmt: skip
    g = read_generations(str(plain))
    assert (g.prompts, g.lengths, g.stopped_at_eos) == (["a", "b"], [4, 9], [True, False])

    monitor = _write_jsonl(tmp_path / "eval.jsonl", [
        {"iteration": it, "index": i, "prompt": p, "response": "", "num_tokens": n, "stopped_at_eos": True}
        for it, rows in ((10, [(1, "b", 3), (0, "a", 2)]), (20, [(1, "b", 30), (0, "a", 20)])) for i, p, n in rows
    ])  # fmt: skip
    assert read_generations(str(monitor)).lengths == [20, 30]  # the last iteration, in prompt order
    assert read_generations(str(monitor), iteration=10).lengths == [2, 3]
    with pytest.raises(GenerationsFileError, match=r"no responses of iteration 15 \(it has \[10, 20\]\)"):
        read_generations(str(monitor), iteration=15)

    alpaca = tmp_path / "outputs.json"
    alpaca.write_text(json.dumps([{"instruction": "a", "output": "hello world", "generator": "m"}]))
    from sampo_megatron.data import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER), "auto")
    g = read_generations(str(alpaca), tokenizer=tokenizer)
    assert g.lengths == [len(tokenizer.encode("hello world"))] and g.stopped_at_eos is None
    with pytest.raises(GenerationsFileError, match=r"outputs.json \(record 0\): no num_tokens; give --tokenizer-model"):
        read_generations(str(alpaca))


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "num_tokens": 3}\n{"prompt": "b", "num_tokens": \n')
    with pytest.raises(GenerationsFileError, match=r"bad.jsonl:2: not valid JSON"):
        read_generations(str(bad))
    bad.write_text('{"prompt": "a", "num_tokens": -1}\n')
    with pytest.raises(GenerationsFileError, match=r"bad.jsonl:1: num_tokens must be a count, got -1"):
        read_generations(str(bad))
    with pytest.raises(GenerationsFileError, match="no such file|No such file"):
        read_generations(str(tmp_path / "missing.jsonl"))


def test_command_line_pairs_by_prompt_and_ends_with_json(tmp_path, capsys):
    prompts = [f"p{i}" for i in range(20)]
    sft = _write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": p, "num_tokens": 10 + i, "stopped_at_eos": True} for i, p in enumerate(prompts)]
    )
    dpo = _write_jsonl(
        tmp_path / "dpo.jsonl", [{"prompt": p, "num_tokens": 15 + i, "stopped_at_eos": i % 2 == 0} for i, p in enumerate(prompts)]
    )
    assert main([str(dpo), "--against", str(sft)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "difference in mean length: +5.00 tokens (+25.6%), 95% interval [+5.00, +5.00] (paired by prompt bootstrap)" in out
    report = json.loads(out[-1])
    assert report["mean"] == 24.5 and report["eos_share"] == 0.5 and report["difference"]["paired"] is True
    assert main([str(tmp_path / "none.jsonl")]) == 1


# A fixed held-out set: (margin, T_w, T_l) per pair; chosen longer in 4 pairs, shorter in 3, one tie.
HELD_OUT = [(0.8, 40, 12), (0.3, 25, 20), (-0.2, 30, 29), (1.1, 60, 10), (-0.5, 8, 30), (0.05, 12, 14), (-0.9, 5, 50),
            (0.4, 20, 20)]  # fmt: skip


def test_length_stratified_equals_a_written_out_float64_computation():
    margins, chosen, rejected = (list(col) for col in zip(*HELD_OUT))
    got = length_stratified(margins, chosen, rejected)
    longer = [m for m, w, l in HELD_OUT if w > l]  # noqa: E741
    shorter = [m for m, w, l in HELD_OUT if w < l]  # noqa: E741
    gaps = [w - l for _, w, l in HELD_OUT]  # noqa: E741
    mean_m, mean_g = sum(margins) / len(margins), sum(gaps) / len(gaps)
    cov = sum((m - mean_m) * (g - mean_g) for m, g in zip(margins, gaps))
    corr = cov / math.sqrt(sum((m - mean_m) ** 2 for m in margins) * sum((g - mean_g) ** 2 for g in gaps))
    expected = {
        "pairs_chosen_longer": 4.0, "pairs_chosen_shorter": 3.0,
        "accuracies_chosen_longer": sum(m > 0 for m in longer) / len(longer), "margins_chosen_longer": sum(longer) / len(longer),
        "accuracies_chosen_shorter": sum(m > 0 for m in shorter) / len(shorter), "margins_chosen_shorter": sum(shorter) / len(shorter),
        "margin_length_corr": corr,
    }  # fmt: skip
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_undefined_stratified_values_are_left_out():
    # policy == reference: every margin 0, the correlation is undefined; no chosen-shorter pair
    got = length_stratified([0.0, 0.0, 0.0], [5, 9, 7], [3, 2, 7])
    assert got == {"pairs_chosen_longer": 2.0, "pairs_chosen_shorter": 0.0, "accuracies_chosen_longer": 0.0,
                   "margins_chosen_longer": 0.0}  # fmt: skip
