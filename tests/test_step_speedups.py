"""The trainer's speed-ups change no result: logits only at response positions equal the full
logits' log-probs and gradients (TP=2, with and without sequence parallelism), and micro-batches
padded to their own longest sequence train exactly as micro-batches padded to --seq-length."""

import json

import pytest
import torch

from sampo_megatron.data import collate_pairs
from sampo_megatron.data.batches import PairBatches, PairDataset, padded_length
from sampo_megatron.data.pairs import PreferencePair

from helpers import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

LAUNCH = REPO_ROOT / "launch" / "pretrain_sampo.py"


def test_padded_length():
    assert padded_length(37, 96, None) == 96
    assert padded_length(37, 96, 8) == 40
    assert padded_length(40, 96, 8) == 40
    assert padded_length(95, 96, 8) == 96  # never past seq_length
    with pytest.raises(ValueError):
        padded_length(5, 96, 0)


def test_variable_collation_is_the_fixed_one_cut_to_the_longest():
    pairs = [PreferencePair(3, [1, 4, 4], [5, 6, 2], [7, 2]), PreferencePair(8, [1], [9] * 10 + [2], [5, 2])]
    fixed = collate_pairs(pairs, seq_length=32, pad_id=0)
    variable = collate_pairs(pairs, seq_length=32, pad_id=0, pad_to_multiple_of=8)
    assert variable["tokens"].shape == (4, 16)  # longest sequence 12 tokens -> 16
    for key in ("tokens", "labels", "response_mask", "position_ids"):
        assert torch.equal(variable[key], fixed[key][:, :16]), key
        # everything cut off is padding: no token, no target, no response position
    assert (fixed["tokens"][:, 16:] == 0).all() and not fixed["response_mask"][:, 16:].any()
    assert torch.equal(variable["sample_ids"], fixed["sample_ids"])
    with pytest.raises(ValueError, match="exceeds seq_length"):
        collate_pairs(pairs, seq_length=8, pad_id=0, pad_to_multiple_of=8)


def test_pair_batches_pad_each_micro_batch_to_its_own_longest():
    pairs = [PreferencePair(i, [1] * 4, [5] * (3 + 7 * i), [6, 2]) for i in range(4)]
    batches = PairBatches(PairDataset(pairs, seed=0), global_batch_size=4, seq_length=64, pad_id=0, pad_to_multiple_of=8)
    _, micro_batches = batches.micro_batches(0, 0, 1, 1)
    _, order = batches.batch_at(0)
    widths = [mb["tokens"].shape[1] for mb in micro_batches]
    assert widths == [-(-(4 + 3 + 7 * p.sample_id) // 8) * 8 for p in order]


def test_response_logits_equal_full_logits_under_tp_and_sequence_parallel(tmp_path):
    out = tmp_path / "result.json"
    run_torchrun("response_logits_worker.py", 2, "--out", str(out))
    result = json.loads(out.read_text())
    for variant in ("tensor_parallel", "sequence_parallel"):
        r = result[variant]
        assert r["full_shape"] == [4, 32, 100]  # [b, s, V/TP]
        assert r["compact_shape"] == [1, r["response_tokens"], 100]  # only the response positions
        assert r["logps_max_rel"] < 1e-6, (variant, r)
        assert r["nonzero_outside_mask"] == 0
        assert r["grad_names_differ"] == 0 and r["num_grads"] > 10
        assert r["grads_max_rel"] < 1e-5, (variant, r)


def _train(tmp_path, name: str, *flags: str) -> list[dict]:
    metrics = tmp_path / f"{name}.jsonl"
    run_torchrun(
        LAUNCH, 1,
        "--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), "--tensor-model-parallel-size", "1",
        "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
        "--lr", "0.05", "--adam-eps", "1e-3", "--lr-warmup-fraction", "0", "--ref-mode", "cache",
        "--save", str(tmp_path / name), "--save-interval", "1000", "--metrics-file", str(metrics), *flags,
    )  # fmt: skip
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_trainer_speedups_train_as_fixed_full_logits(tmp_path):
    """Default (variable widths, response logits, reference cache of variable widths) against fixed
    --seq-length padding and full logits: the same run to fp32 rounding."""
    fast = _train(tmp_path, "fast")
    plain = _train(tmp_path, "plain", "--no-variable-seq-lengths", "--no-response-logits-only")
    assert len(fast) == len(plain) == 3
    assert fast[0]["rewards/margins"] == 0.0 and plain[0]["rewards/margins"] == 0.0
    for a, e in zip(fast, plain):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "grad_norm"):
            assert a[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (a["iteration"], key)
    assert fast[-1]["rewards/margins"] != 0.0
