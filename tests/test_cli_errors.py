"""A user error found after start-up ends a torchrun job with one ``error:`` line (rank 0's), no
Python traceback of ours, a non-zero exit, and torchrun's summary naming the cause (the ranks'
error files); ``SAMPO_TRACEBACK=1`` gives the traceback (cli/train.py)."""

from __future__ import annotations

import json
import re

import pytest

from helpers import LAUNCH, REPO_ROOT, SHIPPED, run_torchrun, torchrun_env

pytestmark = pytest.mark.multiprocess

TOKENIZER = str(REPO_ROOT / "examples" / "data" / "tiny_tokenizer")
FLAGS = ["--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), "--train-iters", "1", "--save", "", "--metrics-file", "",
         "--tokenizer-model", TOKENIZER]  # fmt: skip


def one_error_line(proc, expected: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {expected}"], output[-4000:]
    # torchrun's own launcher traceback (ChildFailedError) is torchrun's; none comes from a rank
    assert not re.search(r'File ".*(sampo_megatron|pretrain_sampo\.py)', output), output[-4000:]
    # torchrun's summary names the cause: each rank's error file holds the line
    summary = output[output.index("Root Cause") :]
    assert f"traceback : error: {expected}" in summary, summary


def test_a_bad_record_is_one_line(tmp_path):
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_torchrun(LAUNCH, 2, *FLAGS, "--data-path", str(bad), launch=True, check=False)
    one_error_line(proc, f"{bad}:1: field 'rejected' is identical to 'chosen' [identical_responses]")

    # the debug switch: the traceback of each rank, as Python prints it
    proc = run_torchrun(LAUNCH, 2, *FLAGS, "--data-path", str(bad), launch=True, check=False,
                        env=torchrun_env(SAMPO_TRACEBACK="1"))  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "BadRecord" in output and re.search(r'File ".*sampo_megatron', output), output[-4000:]


def test_a_load_without_a_checkpoint_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_torchrun(LAUNCH, 2, *FLAGS, "--data-path", str(SHIPPED), "--load", str(empty), launch=True, check=False)
    one_error_line(proc, f"--load {empty}: no checkpoint there")
