"""The trainer on bad input and on indexed data, end to end under torchrun (one process each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sampo_megatron.data.preprocess import PreprocessConfig, preprocess

from helpers import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

LAUNCH = REPO_ROOT / "launch" / "pretrain_sampo.py"
DATA = REPO_ROOT / "examples" / "data"
FLAGS = [
    "--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), "--tensor-model-parallel-size", "1",
    "--train-iters", "2", "--global-batch-size", "8", "--micro-batch-size", "4", "--seq-length", "96",
    "--min-response-tokens", "96", "--save-interval", "1000", "--log-interval", "1",
]  # fmt: skip
# Timing and memory differ between any two runs; everything else must not.
UNSTABLE = ("time", "per_s", "memory")


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """16 good pairs with one bad record of each kind between them; the expected skip counts."""
    good = DATA.joinpath("tiny_pairs.jsonl").read_bytes().splitlines()[:16]
    first = json.loads(good[0])
    bad = {
        "malformed_json": b'{"prompt": "What is one plus one?", "chosen": "Two."',
        "missing_field": json.dumps({"prompt": "hi", "rejected": "It is blue."}).encode(),
        "wrong_type": json.dumps({**first, "chosen": ["It is blue."]}).encode(),
        "empty_response": json.dumps({**first, "rejected": " "}).encode(),
        "identical_responses": json.dumps({**first, "rejected": first["chosen"]}).encode(),
        "no_room_for_response": json.dumps({**first, "chosen": " ".join([first["chosen"]] * 4)}).encode(),
        "invalid_utf8": json.dumps({**first, "chosen": "CHOSEN"}).encode().replace(b"CHOSEN", b"It is \xff blue."),
    }
    lines = []
    for i, line in enumerate(good):
        lines.append(line)
        if i < len(bad):
            lines.append(list(bad.values())[i])
    path = tmp_path_factory.mktemp("bad") / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, {reason: 1 for reason in bad}


def train(tmp: Path, name: str, data: Path, *flags: str, check: bool = True):
    metrics = tmp / name / "metrics.jsonl"
    args = [*FLAGS, "--data-path", str(data), "--save", str(tmp / name / "ckpt"), "--metrics-file", str(metrics), *flags]
    out = run_torchrun(LAUNCH, 1, *args, check=check)
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return [{k: v for k, v in m.items() if not any(u in k for u in UNSTABLE)} for m in steps], out


def test_skip_trains_on_the_rest_and_indexed_data_gives_the_same_run(tmp_path, bad_file):
    path, expected = bad_file
    raw_steps, out = train(tmp_path, "raw", path, "--on-bad-record", "skip")
    assert len(raw_steps) == 2 and raw_steps[-1]["rewards/margins"] != 0.0
    assert "16 pairs kept, 7 bad records skipped" in out
    for reason in expected:
        assert f"  {reason}: 1 (" in out, reason
    # The same file preprocessed (skipping what is bad regardless of length): the very same run.
    prefix = tmp_path / "indexed" / "pairs"
    summary = preprocess(
        PreprocessConfig(str(path), str(prefix), str(DATA / "tiny_tokenizer"), on_bad_record="skip", progress=False)
    )
    assert summary["pairs"] == 17  # the over-long pair is only bad at --seq-length 96 --min-response-tokens 96
    indexed_steps, out = train(tmp_path, "indexed", prefix, "--on-bad-record", "skip")
    assert "indexed dataset" in out and "16 pairs kept, 1 bad records skipped" in out
    assert indexed_steps == raw_steps


def test_error_stops_naming_file_line_field(tmp_path, bad_file):
    path, _ = bad_file
    steps, proc = train(tmp_path, "error", path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not steps
    assert f"{path}:2: malformed JSON" in output  # the first bad record stops the run


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    steps, proc = train(
        tmp_path, "vocab", DATA / "tiny_pairs.jsonl", "--vocab-size", "64", "--on-bad-record", "skip", check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not steps
    assert "--tokenizer-model examples/data/tiny_tokenizer: the tokenizer has" in output and "only 64" in output
