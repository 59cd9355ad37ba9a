"""The length fixes beyond SamPO in the trainer: LD-DPO, length-normalised DPO, ORPO (and TDPO).

The losses themselves are checked against their equations in tests/test_losses.py; here they run
end to end: reference-free losses build no reference, and a parallel layout reproduces one process.
"""

import json
import math

import pytest

from helpers import BASE, assert_same_steps, run_torchrun, train

pytestmark = pytest.mark.multiprocess


def test_orpo_builds_no_reference_and_trains(tmp_path):
    result = tmp_path / "result.json"
    metrics = tmp_path / "metrics.jsonl"
    run_torchrun("reference_kind_worker.py", 1, "--out", str(result), *BASE, "--tensor-model-parallel-size", "1",
                 "--loss-type", "orpo", "--length-debias", "none", "--metrics-file", str(metrics),
                 "--save", str(tmp_path / "ckpt"))  # fmt: skip
    assert json.loads(result.read_text()) == {"reference": "NoReference", "reference_chunks": False}
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_ld_dpo_with_length_normalised_dpo_at_tp2_reproduces_one_process(tmp_path):
    flags = ["--length-debias", "ld_dpo", "--ld-alpha", "0.5", "--loss-type", "sigmoid_norm", "--beta", "1.0"]
    single, _ = train(tmp_path, "single", 1, "--tensor-model-parallel-size", "1", *flags)
    tp2, _ = train(tmp_path, "tp2", 2, "--tensor-model-parallel-size", "2", *flags)
    assert len(single) == 3 and single[0]["loss"] == pytest.approx(math.log(2), rel=1e-7)
    assert single[-1]["loss"] != single[0]["loss"]
    assert_same_steps(tp2, single, rel=1e-5)
