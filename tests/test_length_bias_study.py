"""The length-bias study's generated task (examples/length_bias) and the plotting tool."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from sampo_megatron.cli.plot_metrics import plot_runs, read_metrics, series

# examples/length_bias is on pytest's pythonpath (pyproject.toml).
import task
from assets import write_assets


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


def test_held_out_prompts_ask_for_no_list_the_training_data_asks_for(tmp_path):
    paths = write_assets(str(tmp_path), seed=3, num_pairs=300, num_sft=600, num_heldout=100, num_eval_prompts=100)
    read = {name: [json.loads(line) for line in open(paths[name])] for name in ("sft", "pairs_all", "pairs_long", "pairs_short", "heldout", "eval_prompts")}
    seen = {tuple(sorted(int(c) for c in r["prompt"].split() if c.isdigit())) for n in ("sft", "pairs_all", "pairs_long", "pairs_short") for r in read[n]}
    for name in ("heldout", "eval_prompts"):
        assert read[name] and not seen & {tuple(sorted(int(c) for c in r["prompt"].split() if c.isdigit())) for r in read[name]}
    assert len({r["prompt"] for r in read["eval_prompts"]}) == 100


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


def test_the_interval_is_students_t_over_seeds():
    from report import interval

    mean, half = interval([1.0, 2.0, 3.0])  # sd 1, n 3: t(0.975, 2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / 3**0.5, rel=1e-12)
    assert interval([5.0, 5.0]) == (5.0, 0.0)
    mean, half = interval([0.5])
    assert mean == 0.5 and half != half  # one seed: no interval (NaN), never a made-up one


@pytest.mark.multiprocess
def test_quick_study_runs_end_to_end_and_its_table_is_what_the_runs_wrote(tmp_path):
    """``run.py --quick``: SFT, DPO and SamPO on the three data sets with two seeds, and the report.
    The report's accuracy for DPO on the mixed set is recomputed here from the runs' generation
    files (the task's checker, mean and t(0.975, 1) = 12.706 half-width written out). The same
    command again reuses every run."""
    from helpers import REPO_ROOT

    subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "length_bias" / "run.py"), "--quick", "--out-dir", str(tmp_path)],
                   check=True, cwd=REPO_ROOT, timeout=900, stdout=subprocess.DEVNULL)  # fmt: skip
    report = (tmp_path / "length_bias_study.md").read_text()
    cells = [[c.strip() for c in line.split("|")[1:3]] for line in report.splitlines() if line.startswith(("| DPO |", "| SamPO |"))]
    rows = {tuple(c) for c in cells if c[1] in ("mixed", "long", "short")}  # the flags table has the flags there
    assert rows == {(m, s) for m in ("DPO", "SamPO") for s in ("mixed", "long", "short")}
    # every number of both tables is "mean ± half-width"
    for line in report.splitlines():
        if line.startswith(("| DPO | mixed | 2 |", "| SamPO | short | 2 |")):
            assert line.count("±") == 5, line
    accuracies = []
    for seed in (1, 2):
        records = [json.loads(line) for line in (tmp_path / "mixed" / "dpo" / f"seed{seed}" / "generations.jsonl").read_text().splitlines()]
        last = max(r["iteration"] for r in records)
        accuracies.append(statistics.fmean(task.is_correct(r["prompt"], r["response"]) for r in records if r["iteration"] == last) * 100)
    mean, half = statistics.fmean(accuracies), 12.706 * statistics.stdev(accuracies) / 2**0.5
    row = next(line for line in report.splitlines() if line.startswith("| DPO | mixed | 2 |"))
    shown_mean, shown_half = (float(x) for x in row.split("|")[4].split("±"))
    # one decimal shown: within half a unit of the last digit (a value on the boundary may round either way)
    assert abs(shown_mean - mean) <= 0.05 + 1e-9 and abs(shown_half - half) <= 0.05 + 1e-9, (row, mean, half)
    for subset in ("mixed", "long", "short"):
        for name in (f"length_bias_curves_{subset}.png", f"length_bias_margin_vs_length_{subset}.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in report

    # The same command again redoes nothing and writes the same report.
    specs = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/seed*/run_spec.json")}
    assert len(specs) == 12
    subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "length_bias" / "run.py"), "--quick", "--out-dir", str(tmp_path)],
                   check=True, cwd=REPO_ROOT, timeout=900, stdout=subprocess.DEVNULL)  # fmt: skip
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in specs.items())
    assert (tmp_path / "length_bias_study.md").read_text() == report


@pytest.mark.multiprocess
def test_a_finished_run_is_reused_only_with_the_same_command_and_data(tmp_path):
    """run.py's ``train``: a data file whose content changed under the same path (another
    --long-chosen-share rewrites pairs_all.jsonl) makes the run start over; so does ``force``."""
    from run import train

    paths = write_assets(str(tmp_path / "data"), seed=1, num_pairs=64, num_sft=64, num_heldout=8, num_eval_prompts=4)
    flags = ["--tokenizer-model", paths["tokenizer"], "--eval-prompts", paths["eval_prompts"], "--eval-data-path", paths["heldout"],
             "--eval-interval", "2", "--data-path", paths["sft"], "--loss-type", "sft", "--length-debias", "none"]  # fmt: skip
    run_dir = str(tmp_path / "run")

    def ran(**kwargs) -> bool:
        return train("sft", run_dir, 2, flags, lambda text: None, **kwargs)[1]

    assert ran()
    assert not ran()  # the same command and data: reused
    assert ran(force=True)
    with open(paths["sft"], "a") as f:
        f.write(open(paths["sft"]).readline())
    assert ran()
    assert not ran()
