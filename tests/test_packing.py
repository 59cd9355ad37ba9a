"""--pack-sequences (data/packing.py): the packing plan, the THD fields handed to the model, and
packed training against unpacked training on every CPU layout."""

from __future__ import annotations

import time

import pytest
import torch

from sampo_megatron.config import parse_config
from sampo_megatron.data import PairBatches, PairDataset, PreferencePair
from sampo_megatron.data.packing import collate_packed, pack_pairs, packed_seq_params, pair_tokens, to_loss_rows
from sampo_megatron.validation import config_problems, packing_enabled

from helpers import BASE, COMPARED, BackgroundRun, assert_same_steps, run_torchrun, train


def pair(sample_id: int, prompt: int, chosen: int, rejected: int) -> PreferencePair:
    base = 10 * sample_id
    return PreferencePair(sample_id, list(range(base, base + prompt)), [1000 + sample_id] * chosen, [2000 + sample_id] * rejected)


def test_first_fit_decreasing_keeps_pairs_whole_and_is_deterministic():
    pairs = [pair(i, 2, c, r) for i, (c, r) in enumerate([(3, 1), (10, 6), (2, 2), (7, 7), (1, 1)])]
    sizes = [pair_tokens(p) for p in pairs]  # 8, 20, 8, 18, 6
    packs = pack_pairs(pairs, 26)
    # longest first: 1 -> A (6 left), 3 -> B (8 left), 0 -> B (full), 2 -> C, 4 -> A; packs by first pair
    assert [[p.sample_id for p in pack] for pack in packs] == [[0, 3], [1, 4], [2]]
    assert all(sum(pair_tokens(p) for p in pack) <= 26 for pack in packs)
    assert sorted(p.sample_id for pack in packs for p in pack) == list(range(5)) and sum(sizes) == 60
    assert [[p.sample_id for p in pack] for pack in pack_pairs(pairs, 26)] == [[0, 3], [1, 4], [2]]
    with pytest.raises(ValueError, match="sample 1: its two sequences \\(20 tokens\\) exceed a pack of 19"):
        pack_pairs(pairs, 19)


def test_a_known_pack_gives_megatron_the_right_thd_fields():
    a, b = pair(0, 2, 3, 1), pair(1, 1, 2, 4)  # sequences of 5, 3 (pair 0) and 3, 5 (pair 1)
    batch = collate_packed([a, b], width=20, pad_id=0)
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 11, 16, 20]  # the trailing padding is its own sequence
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 0, 0]
    seq = a.prompt_ids + a.chosen_ids
    assert batch["tokens"][0, :5].tolist() == seq
    assert batch["labels"][0, :5].tolist() == seq[1:] + [0]  # no label crosses into the next sequence
    # loss rows: chosen of pairs 0, 1, then rejected of pairs 0, 1 (as unpacked), width = longest sequence
    assert batch["response_mask"].shape == (4, 5) and batch["packed_index"].shape == (4, 5)
    assert batch["packed_index"][0].tolist() == [0, 1, 2, 3, 4]  # chosen of pair 0
    assert batch["packed_index"][1].tolist() == [8, 9, 10, -1, -1]  # chosen of pair 1
    assert batch["packed_index"][2].tolist() == [5, 6, 7, -1, -1]  # rejected of pair 0
    assert batch["packed_index"][3].tolist() == [11, 12, 13, 14, 15]
    assert batch["response_mask"][0].tolist() == [False, True, True, True, False]
    assert batch["packed_response_mask"][0, 8:11].tolist() == [True, True, False]
    params = packed_seq_params(batch)
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 5
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 5, 8, 11, 16, 20]
    values = torch.arange(20, dtype=torch.float32)[None]
    rows = to_loss_rows(values, batch)
    assert rows[1].tolist() == [8, 9, 10, 0, 0] and rows[3].tolist() == [11, 12, 13, 14, 15]


def test_a_step_takes_the_kind_of_micro_batch_its_plan_packs():
    """Packed or padded is the plan's decision (StepContext.packed), not read from a batch's keys: a
    micro-batch of the other kind is an error, not a silently different loss scale."""
    from sampo_megatron.data.batches import collate_pairs
    from sampo_megatron.training.step import StepContext, _model_logits

    pairs = [PreferencePair(0, [1, 2], [3, 4, 5], [6, 7]), PreferencePair(1, [1], [8, 9], [10, 11, 12])]
    padded, packed = collate_pairs(pairs, 16, pad_id=0), collate_packed(pairs, 24, pad_id=0)
    with pytest.raises(RuntimeError, match="a padded micro-batch in a step of packed micro-batches"):
        _model_logits(StepContext(loss=None, tp_group=None, vocab_size=16, packed=True), padded, model=None)
    with pytest.raises(RuntimeError, match="a packed micro-batch in a step of padded micro-batches"):
        _model_logits(StepContext(loss=None, tp_group=None, vocab_size=16), packed, model=None)


def test_packed_batches_cover_the_step_and_scale_the_loss_to_the_global_mean():
    pairs = [pair(i, 2, 1 + i % 5, 1 + (3 * i) % 7) for i in range(16)]
    unpacked = PairBatches(PairDataset(pairs, 3), 8, 12, 0, pad_to_multiple_of=1)
    packed = PairBatches(PairDataset(pairs, 3), 8, 12, 0, pack_capacity=48)
    for rank in range(2):
        _, plain = unpacked.micro_batches(1, rank, 2, 2)
        _, packs = packed.micro_batches(1, rank, 2, 2)
        assert sorted(torch.cat([b["sample_ids"] for b in packs]).tolist()) == sorted(torch.cat([b["sample_ids"] for b in plain]).tolist())
        # sum over packs of (pairs x scale), averaged over micro-batches and DP ranks = 1 per pair
        assert sum(len(b["sample_ids"]) * float(b["loss_scale"]) for b in packs) / len(packs) / 2 == pytest.approx(4 / 8)
    stats, packed_stats = unpacked.padding_stats(1, 2, 2), packed.padding_stats(1, 2, 2)
    assert stats["pack/sequences_per_row"] == 1.0 and packed_stats["pack/sequences_per_row"] > 2
    assert 0 <= packed_stats["padding_fraction"] < stats["padding_fraction"] < 1


@pytest.mark.parametrize(
    "flags,problem",
    [
        (["--local-attention", "megatron"], "--pack-sequences needs --local-attention sdpa"),
        (["--context-parallel-size", "2", "--transformer-impl", "transformer_engine"], "does not support --context-parallel-size"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"],
         "interleaved pipeline"),
        (["--loss-type", "kto_pair"], "a --loss-type kto_pair pair's loss depends on the other pairs of its micro-batch"),
        (["--loss-type", "bco_pair"], "a --loss-type bco_pair pair's loss depends on the other pairs of its micro-batch"),
    ],
)  # fmt: skip
def test_packing_refuses_what_it_cannot_do(flags, problem):
    base = ["--data-path", "x", "--tokenizer-model", "y", "--train-iters", "1", *flags]
    cfg = parse_config(["--pack-sequences", *base])
    assert any(problem in p for p in config_problems(cfg, purpose="generate")), config_problems(cfg, purpose="generate")
    # by default such a run is simply not packed
    default = parse_config(base)
    assert not packing_enabled(default) and not any("pack" in p for p in config_problems(default, purpose="generate"))


@pytest.mark.parametrize(
    "flags,packed",
    [
        ([], True),  # the local spec (SDPA attention): measured and proven (docs/packing.md)
        (["--no-pack-sequences"], False),
        (["--transformer-impl", "transformer_engine"], False),  # THD numerics are checked on a GPU only
        (["--transformer-impl", "transformer_engine", "--pack-sequences"], True),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "4"], True),
    ],
)  # fmt: skip
def test_packing_is_on_by_default_where_it_runs_and_was_measured(flags, packed):
    cfg = parse_config(["--data-path", "x", "--tokenizer-model", "y", "--train-iters", "1", *flags])
    assert packing_enabled(cfg) is packed


# ------------------------------------------------------------------------ packed = unpacked
PACKED_KEYS = COMPARED + ("rewards/accuracies", "lengths/kept")


def assert_packed_matches(packed: list[dict], plain: list[dict], keys=PACKED_KEYS) -> None:
    """Everything at rel 1e-5 over the first step and the one after it (whose rewards are the first
    update's), the loss at rel 1e-5 at every step. Later rewards get rel 1e-4: each is a small
    difference of two sums of ~100 log-probs, and the packed row's attention (one SDPA call per
    sequence) rounds differently from a padded row's, which training at lr 0.05 amplifies (measured:
    rel 1.3e-5 on a margin at step 3, with the loss at 3.8e-6)."""
    keys = [k for k in keys if k in plain[0]]
    assert_same_steps(packed[:2], plain[:2], rel=1e-5, keys=keys)
    assert_same_steps(packed, plain, rel=1e-5, keys=("loss",))
    assert_same_steps(packed, plain, rel=1e-4, keys=keys)
TP1 = ["--tensor-model-parallel-size", "1", "--train-iters", "4"]
# 4-step runs at TP=1. The objectives dpo, sampo (both masks), sampo_topk, sanorm and simpo are
# compared pair by pair and gradient by gradient at every layout below
# (test_packed_pairs_and_gradients_equal_unpacked); here: SamPO over several steps, the replica's
# kept hidden states (TDPO's KL) and the reference cache's unpacked rows.
OBJECTIVES = {
    "sampo_shared": ["--length-debias", "sampo"],
    "tdpo2": ["--length-debias", "none", "--loss-type", "tdpo2"],
    "sampo_cache": ["--length-debias", "sampo", "--ref-mode", "cache"],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_packed_training_equals_unpacked(tmp_path, objective):
    cached = "cache" in OBJECTIVES[objective]  # the reference cache is written under --save
    plain, _ = train(tmp_path, "plain", 1, *TP1, *OBJECTIVES[objective], "--no-pack-sequences", save=cached)
    packed, out = train(tmp_path, "packed", 1, *TP1, *OBJECTIVES[objective], "--pack-sequences", save=cached)
    assert len(packed) == 4
    assert_packed_matches(packed, plain)
    assert all(p["padding_fraction"] < u["padding_fraction"] for p, u in zip(packed, plain))
    assert all(p["pack/sequences_per_row"] > 2 for p in packed) and "seqs/row" in out


LAYOUTS = {
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]),
    "dp2": (2, ["--tensor-model-parallel-size", "1"]),
}


BETA = 0.1  # examples/tiny_cpu.yaml


def pair_values(tmp_path, nproc: int, *flags: str) -> dict:
    """tests/workers/packed_pairs_worker.py: one step per objective, unpacked and packed; per-pair
    values and gradients."""
    out = tmp_path / "pairs.pt"
    run_torchrun("packed_pairs_worker.py", nproc, "--out", str(out), *BASE, "--save", str(tmp_path / "run"), "--metrics-file", "", *flags)
    return torch.load(out, weights_only=False)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp1", *LAYOUTS])
def test_packed_pairs_and_gradients_equal_unpacked(tmp_path, layout):
    """Every pair's loss, rewards (debiased and full), log-prob sums and token log-probs, and every
    parameter's gradient after one step, packed vs unpacked at the same layout, for each objective
    of the worker (dpo, sampo shared and independent, sampo_topk, sanorm, simpo).

    Tolerance rel 1e-5 everywhere. A reward is beta x a difference of a policy and a reference sum
    of log-probs (fp32, rounded differently in a packed row): it is compared at rel 1e-5 of those
    sums, beta x (|policy sum| + |reference sum|), taken as beta x 2 x the pair's larger full sum."""
    nproc, flags = LAYOUTS.get(layout, (1, []))
    values = pair_values(tmp_path, nproc, *TP1, *flags)
    plain, packed = values["unpacked"], values["packed"]
    assert plain.keys() == packed.keys() and len(plain) == 6
    for objective, expected in plain.items():
        actual = packed[objective]
        assert actual["packed"] and not expected["packed"]
        assert sorted(actual["pairs"]) == sorted(expected["pairs"]) and len(expected["pairs"]) == 8
        for sample_id, values in expected["pairs"].items():
            for key, value in values.items():
                where = (objective, sample_id, key)
                if isinstance(value, torch.Tensor):  # the response tokens' log-probs
                    torch.testing.assert_close(actual["pairs"][sample_id][key], value, rtol=1e-5, atol=1e-6, msg=str(where))
                else:
                    sums = 2 * BETA * max(abs(values["logps_full/chosen"]), abs(values["logps_full/rejected"]))
                    floor = 1e-5 * sums if key.startswith("rewards") else 1e-7
                    assert actual["pairs"][sample_id][key] == pytest.approx(value, rel=1e-5, abs=floor), where
        assert actual["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            error = float((actual["grads"][name] - grad).norm() / grad.norm())
            assert error <= 1e-5, (objective, name, error)


@pytest.mark.multiprocess
def test_packed_run_killed_resumes_exactly(tmp_path):
    flags = ["--tensor-model-parallel-size", "2", "--train-iters", "12", "--save-interval", "2", "--lr", "0.01", "--pack-sequences"]
    run = BackgroundRun(tmp_path, "killed", 2, *flags)
    try:
        run.wait_for(lambda: (run.ckpt / "latest_checkpointed_iteration.txt").exists(), timeout=300)
    finally:
        run.kill()
    time.sleep(1)  # the ranks notice their launcher is gone (training/run_lock.py)
    at = run.marker()
    assert 2 <= at < 12
    stop = ["--exit-interval", str(at + 2)]  # the resumed and the straight run stop two steps past the checkpoint
    resumed, out = train(tmp_path, "killed", 2, *flags, *stop, save=True)
    assert f"at iteration {at}" in out
    straight, _ = train(tmp_path, "straight", 2, *flags, *stop)
    assert [m["iteration"] for m in straight] == list(range(1, at + 3))
    assert_same_steps(resumed[-2:], straight[at:], rel=1e-6, keys=COMPARED + ("lr", "padding_fraction"))
