"""--pack-sequences (data/packing.py): the packing plan, the THD fields handed to the model, and
packed training against unpacked training on every CPU layout."""

from __future__ import annotations

import time

import pytest
import torch

from sampo_megatron.config import parse_config
from sampo_megatron.data import PairBatches, PairDataset, PreferencePair
from sampo_megatron.data.packing import collate_packed, pack_pairs, packed_seq_params, pair_tokens, to_loss_rows
from sampo_megatron.validation import config_problems

from helpers import COMPARED, BackgroundRun, assert_same_steps, train


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
    ],
)  # fmt: skip
def test_packing_refuses_what_it_cannot_do(flags, problem):
    cfg = parse_config(["--pack-sequences", "--data-path", "x", "--tokenizer-model", "y", "--train-iters", "1", *flags])
    assert any(problem in p for p in config_problems(cfg, purpose="generate")), config_problems(cfg, purpose="generate")


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
OBJECTIVES = {
    "dpo": ["--length-debias", "none"],
    "sampo_shared": ["--length-debias", "sampo"],
    "sampo_independent": ["--length-debias", "sampo", "--sampo-mask", "independent"],
    "sampo_topk": ["--length-debias", "sampo_topk"],
    "sanorm": ["--length-debias", "sanorm"],
    "simpo": ["--length-debias", "none", "--loss-type", "simpo"],
    # the replica's kept hidden states (TDPO's KL) and the reference cache's unpacked rows
    "tdpo2": ["--length-debias", "none", "--loss-type", "tdpo2"],
    "sampo_cache": ["--length-debias", "sampo", "--ref-mode", "cache"],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_packed_training_equals_unpacked(tmp_path, objective):
    plain, _ = train(tmp_path, "plain", 1, *TP1, *OBJECTIVES[objective])
    packed, out = train(tmp_path, "packed", 1, *TP1, *OBJECTIVES[objective], "--pack-sequences")
    assert len(packed) == 4
    assert_packed_matches(packed, plain)
    assert all(p["padding_fraction"] < u["padding_fraction"] for p, u in zip(packed, plain))
    assert all(p["pack/sequences_per_row"] > 2 for p in packed) and "seqs/row" in out


LAYOUTS = {
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]),
    "dp2": (2, ["--tensor-model-parallel-size", "1"]),
}


@pytest.fixture(scope="module")
def unpacked_sampo(tmp_path_factory):
    metrics, _ = train(tmp_path_factory.mktemp("unpacked"), "plain", 1, *TP1, *OBJECTIVES["sampo_shared"])
    return metrics


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_layouts_equal_unpacked_single_process(tmp_path, unpacked_sampo, layout):
    nproc, flags = LAYOUTS[layout]
    packed, _ = train(tmp_path, layout, nproc, *TP1, *flags, *OBJECTIVES["sampo_shared"], "--pack-sequences")
    assert_packed_matches(packed, unpacked_sampo)


@pytest.mark.multiprocess
def test_packed_run_killed_resumes_exactly(tmp_path):
    flags = ["--tensor-model-parallel-size", "2", "--train-iters", "12", "--save-interval", "2", "--lr", "0.01", "--pack-sequences"]
    straight, _ = train(tmp_path, "straight", 2, *flags)
    run = BackgroundRun(tmp_path, "killed", 2, *flags)
    try:
        run.wait_for(lambda: (run.ckpt / "latest_checkpointed_iteration.txt").exists(), timeout=300)
    finally:
        run.kill()
    time.sleep(1)  # the ranks notice their launcher is gone (training/run_lock.py)
    at = run.marker()
    assert 2 <= at < 12
    resumed, out = train(tmp_path, "killed", 2, *flags)
    assert f"at iteration {at}" in out
    assert_same_steps(resumed[-(12 - at) :], straight[at:], rel=1e-6, keys=COMPARED + ("lr", "padding_fraction"))
