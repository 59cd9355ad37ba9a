"""The length fixes beyond SamPO in the trainer: LD-DPO, length-normalised DPO, ORPO (and TDPO).

The losses themselves are checked against their equations in tests/test_losses.py; here they run
end to end: reference-free losses build no reference, and a parallel layout reproduces one process.
"""

import json
import math

import pytest

from helpers import BASE, COMPARED, assert_same_steps, run_torchrun, train

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


# TDPO: the reference is a checkpoint two SamPO steps away from the policy's initialisation, so the
# per-token KL is not zero at the first step.
TDPO_LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2_sequence_parallel": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]),
}


@pytest.fixture(scope="module")
def tdpo_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tdpo_reference")
    train(tmp, "ref", 1, "--tensor-model-parallel-size", "1", "--train-iters", "2", "--save-interval", "2", save=True)
    return tmp / "ref" / "ckpt"


def _tdpo_flags(reference, loss_type="tdpo2"):
    return ["--loss-type", loss_type, "--length-debias", "none", "--lr", "0.01", "--ref-load", str(reference)]


@pytest.fixture(scope="module")
def tdpo_single(tmp_path_factory, tdpo_reference):
    tmp = tmp_path_factory.mktemp("tdpo_single")
    metrics, _ = train(tmp, "single", 1, "--tensor-model-parallel-size", "1", *_tdpo_flags(tdpo_reference))
    return metrics


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
def test_tdpo_first_step_equals_float64_oracle(tmp_path, tdpo_reference, loss_type):
    oracle_file, metrics_file = tmp_path / "oracle.json", tmp_path / "metrics.jsonl"
    # the oracle runs the model on the trainer's micro-batches as padded rows (packed TDPO equals
    # unpacked TDPO: tests/test_packing.py)
    run_torchrun("tdpo_oracle_worker.py", 1, "--out", str(oracle_file), *BASE, "--tensor-model-parallel-size", "1",
                 *_tdpo_flags(tdpo_reference, loss_type), "--train-iters", "1", "--metrics-file", str(metrics_file),
                 "--save", str(tmp_path / "ckpt"), "--no-pack-sequences")  # fmt: skip
    oracle = json.loads(oracle_file.read_text())
    first = json.loads(metrics_file.read_text().splitlines()[0])
    assert oracle["kl/chosen"] > 1e-3  # the reference differs from the policy: the KL term is exercised
    for key, expected in oracle.items():
        assert first[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), (key, first[key], expected)


@pytest.mark.parametrize("layout", list(TDPO_LAYOUTS))
def test_tdpo_parallel_layouts_reproduce_single_process(tmp_path, tdpo_reference, tdpo_single, layout):
    nproc, flags = TDPO_LAYOUTS[layout]
    metrics, _ = train(tmp_path, layout, nproc, *flags, *_tdpo_flags(tdpo_reference))
    assert len(metrics) == 3 and tdpo_single[-1]["loss"] != tdpo_single[0]["loss"]
    assert_same_steps(metrics, tdpo_single, rel=1e-5, keys=(*COMPARED, "kl/chosen", "kl/rejected"))
