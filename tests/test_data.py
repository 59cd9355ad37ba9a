"""Tests of the data layer (sampo_megatron.data) with the real tokenizers and the shipped assets."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from sampo_megatron.data import (
    HuggingFaceTokenizer,
    PairBatches,
    PairDataset,
    PreferencePair,
    SentencePieceTokenizer,
    collate_pairs,
    load_tokenizer,
    read_pairs_jsonl,
    split_for_rank,
    truncate_pair,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "examples" / "data" / "tiny_tokenizer"
PAIRS_JSONL = ROOT / "examples" / "data" / "tiny_pairs.jsonl"


@pytest.fixture(scope="module")
def hf_tok() -> HuggingFaceTokenizer:
    return load_tokenizer(str(TOKENIZER_DIR))


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(i, [1, 10 + i], [20 + i, 2], [30 + i, 31, 2]) for i in range(n)]


def test_tokenising_a_large_file_shows_progress(hf_tok, tmp_path):
    from sampo_megatron.data.errors import BadRecordLog
    from sampo_megatron.data.reading import DataOptions, read_raw_pairs

    path = tmp_path / "big.jsonl"
    path.write_text(PAIRS_JSONL.read_text() * 9)  # > 2000 records
    said: list[str] = []
    pairs, _ = read_raw_pairs(str(path), hf_tok, DataOptions(256), BadRecordLog("error"), said.append, every_s=0)
    assert len(pairs) > 2000
    assert [line.split(" records")[0] for line in said] == ["data: 1000", "data: 2000"]
    assert f"of {path} tokenised in" in said[0]


# --- tokenizers ---------------------------------------------------------------------------------


def test_hf_tokenizer_round_trip(hf_tok):
    assert isinstance(hf_tok, HuggingFaceTokenizer)
    assert (hf_tok.pad_id, hf_tok.bos_id, hf_tok.eos_id) == (0, 1, 2)
    assert 4 < hf_tok.vocab_size <= 1024
    text = "Question: What is the capital of France? The capital of France is Paris."
    ids = hf_tok.encode(text)
    assert ids and all(3 < i < hf_tok.vocab_size for i in ids)  # no special tokens, no <unk>
    assert hf_tok.decode(ids) == text
    with_special = hf_tok.decode([hf_tok.bos_id] + ids + [hf_tok.eos_id])
    assert with_special.startswith("<s>") and with_special.endswith("</s>") and text in with_special
    assert hf_tok.encode("What is  the\ncapital?") == hf_tok.encode("What is the capital?")  # whitespace normalised


def test_sentencepiece_round_trip(tmp_path):
    import sentencepiece as spm

    lines = [r[k] for r in map(json.loads, PAIRS_JSONL.read_text().splitlines()) for k in ("prompt", "chosen")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=128,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))  # auto: *.model -> sentencepiece
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 128 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.pad_id == tok.eos_id  # sentencepiece's default has no pad piece
    text = "What is seven plus four? Seven plus four is eleven."
    ids = tok.encode(text)
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text

    # The reader works the same on top of it.
    pairs = read_pairs_jsonl(str(PAIRS_JSONL), tok, seq_length=512)
    assert pairs[0].prompt_ids[0] == tok.bos_id and pairs[0].chosen_ids[-1] == tok.eos_id


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_type"):
        load_tokenizer(str(TOKENIZER_DIR), "tiktoken")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))
    odd = tmp_path / "vocab.txt"
    odd.write_text("a\n")
    with pytest.raises(ValueError, match="cannot tell"):
        load_tokenizer(str(odd))


# --- reading and truncation ---------------------------------------------------------------------


def test_shipped_pairs_load(hf_tok):
    pairs = read_pairs_jsonl(str(PAIRS_JSONL), hf_tok, seq_length=256)
    assert 200 <= len(pairs) <= 300
    assert [p.sample_id for p in pairs] == list(range(len(pairs)))
    unk = 3
    for p in pairs:
        assert p.prompt_ids[0] == hf_tok.bos_id and p.prompt_ids.count(hf_tok.bos_id) == 1
        assert p.chosen_ids[-1] == hf_tok.eos_id and p.rejected_ids[-1] == hf_tok.eos_id
        assert unk not in p.prompt_ids + p.chosen_ids + p.rejected_ids
    longer = sum(len(p.chosen_ids) > len(p.rejected_ids) for p in pairs) / len(pairs)
    assert 0.55 <= longer <= 0.75


def test_shipped_assets_regenerate_identically(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_tiny_assets", ROOT / "tools" / "make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the script is executed.
    monkeypatch.setitem(sys.modules, "make_tiny_assets", module)
    spec.loader.exec_module(module)
    module.main(["--out-dir", str(tmp_path)])
    shipped = ROOT / "examples" / "data"
    for rel in (
        "tiny_pairs.jsonl",
        "length_bias_pairs.jsonl",
        "tiny_tokenizer/tokenizer.json",
        "tiny_tokenizer/tokenizer_config.json",
        "tiny_tokenizer/special_tokens_map.json",
    ):
        assert (tmp_path / rel).read_bytes() == (shipped / rel).read_bytes(), rel


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.9, 1.0])
def test_length_bias_is_controllable(monkeypatch, fraction):
    spec = importlib.util.spec_from_file_location("make_tiny_assets", ROOT / "tools" / "make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_tiny_assets", module)
    spec.loader.exec_module(module)
    pairs = module.make_pairs(seed=5, num_pairs=40, chosen_longer_fraction=fraction)
    longer = sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in pairs)
    assert longer == round(fraction * 40) and len(pairs) == 40


def test_prompt_truncated_from_left_keeps_end(hf_tok, tmp_path):
    numbers = " ".join(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": numbers, "chosen": "It is blue.", "rejected": "red"}])
    prompt = hf_tok.encode(numbers)
    chosen = hf_tok.encode("It is blue.") + [hf_tok.eos_id]
    # Enough room for BOS + 3 prompt tokens next to the longer (chosen) response.
    (pair,) = read_pairs_jsonl(str(path), hf_tok, seq_length=1 + 3 + len(chosen))
    assert pair.prompt_ids == [hf_tok.bos_id] + prompt[-3:]
    assert hf_tok.decode(pair.prompt_ids[1:]) == "eight nine ten"
    assert pair.chosen_ids == chosen  # responses untouched
    assert pair.rejected_ids == hf_tok.encode("red") + [hf_tok.eos_id]
    # Untruncated when it fits.
    (pair,) = read_pairs_jsonl(str(path), hf_tok, seq_length=64)
    assert pair.prompt_ids == [hf_tok.bos_id] + prompt

    # Without BOS the tail alone is kept, at least one token.
    p, c, r = truncate_pair([5, 6, 7, 8], [9, 9, 2], [9, 2], seq_length=5)
    assert (p, c, r) == ([7, 8], [9, 9, 2], [9, 2])
    p, c, r = truncate_pair([5, 6, 7, 8], [9, 9, 2], [9, 2], seq_length=4)
    assert (p, c, r) == ([8], [9, 9, 2], [9, 2])


def test_response_truncated_from_right(hf_tok, tmp_path):
    long = "The capital of France is Paris. Many visitors travel to Paris every year."
    path = _write_jsonl(
        tmp_path / "r.jsonl", [{"prompt": "Question: What is the capital of France?", "chosen": long, "rejected": "Rome"}]
    )
    (pair,) = read_pairs_jsonl(str(path), hf_tok, seq_length=6)
    assert pair.prompt_ids == [hf_tok.bos_id]  # the prompt shrinks to one token first
    assert pair.chosen_ids == hf_tok.encode(long)[:5]  # then the response keeps its start, no EOS
    assert pair.rejected_ids == hf_tok.encode("Rome") + [hf_tok.eos_id]  # short one is untouched
    # Without BOS (add_bos=False) the one kept prompt token is the prompt's last one ("?").
    (pair,) = read_pairs_jsonl(str(path), hf_tok, seq_length=6, add_bos=False)
    assert hf_tok.decode(pair.prompt_ids) == "?"
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 6
    with pytest.raises(ValueError, match="seq_length"):
        truncate_pair([1], [2], [2], seq_length=1)


@pytest.mark.parametrize(
    "line, field, message",
    [
        ('{"prompt": "hi", "chosen": "yes"', None, "malformed JSON"),
        ('["hi", "yes", "no"]', None, "JSON object"),
        ('{"prompt": "hi", "rejected": "no"}', "chosen", "is missing"),
        ('{"chosen": "yes", "rejected": "no"}', "prompt", "is missing"),
        ('{"prompt": "hi", "chosen": "yes", "rejected": 3}', "rejected", "must be a string"),
        ('{"prompt": ["hi"], "chosen": "yes", "rejected": "no"}', "prompt", "must be a string"),
        ('{"prompt": "hi", "chosen": "", "rejected": "no"}', "chosen", "is empty"),
        ('{"prompt": "hi", "chosen": "yes", "rejected": "   "}', "rejected", "is empty"),
    ],
)
def test_bad_input_names_file_line_field(hf_tok, tmp_path, line, field, message):
    good = {"prompt": "What is one plus one?", "chosen": "Two.", "rejected": "Three."}
    path = _write_jsonl(tmp_path / "pairs.jsonl", [good, "", good, line, good])  # bad record on line 4
    with pytest.raises(ValueError) as info:
        read_pairs_jsonl(str(path), hf_tok, seq_length=32)
    text = str(info.value)
    assert text.startswith(f"{path}:4: "), text
    assert message in text
    if field is not None:
        assert f"field '{field}'" in text


def test_blank_lines_do_not_shift_sample_ids(hf_tok, tmp_path):
    good = {"prompt": "What is one plus one?", "chosen": "Two.", "rejected": "Three."}
    path = _write_jsonl(tmp_path / "pairs.jsonl", [good, "", "  ", good])
    assert [p.sample_id for p in read_pairs_jsonl(str(path), hf_tok, seq_length=32)] == [0, 1]


# --- collation ----------------------------------------------------------------------------------


def test_collate_alignment_and_fixed_shape(hf_tok):
    pairs = read_pairs_jsonl(str(PAIRS_JSONL), hf_tok, seq_length=96)[:5]
    seq_length, pad = 96, hf_tok.pad_id
    batch = collate_pairs(pairs, seq_length, pad)
    n = len(pairs)
    for key in ("tokens", "labels", "response_mask", "position_ids"):
        assert batch[key].shape == (2 * n, seq_length), key
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["response_mask"].dtype == torch.bool
    assert torch.equal(batch["sample_ids"], torch.tensor([p.sample_id for p in pairs]))
    assert torch.equal(batch["position_ids"][3], torch.arange(seq_length))
    for i, p in enumerate(pairs):
        for row, response in ((i, p.chosen_ids), (n + i, p.rejected_ids)):
            tokens, labels, mask = batch["tokens"][row], batch["labels"][row], batch["response_mask"][row]
            length = len(p.prompt_ids) + len(response)
            assert tokens[:length].tolist() == p.prompt_ids + response
            assert (tokens[length:] == pad).all()
            assert torch.equal(labels[:-1], torch.where(torch.arange(seq_length - 1) < length - 1, tokens[1:], pad))
            assert labels[-1] == pad
            t = mask.nonzero().squeeze(1)
            # The targets of masked positions, i.e. tokens at t + 1, are exactly response + EOS.
            assert tokens[t + 1].tolist() == response and labels[t].tolist() == response
            assert response[-1] == hf_tok.eos_id
            assert t[0] == len(p.prompt_ids) - 1 and t.numel() == len(response)


def test_collate_pads_short_and_rejects_long():
    batch = collate_pairs([PreferencePair(7, [1], [5, 2], [6, 2])], seq_length=8, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 5, 2, 0, 0, 0, 0, 0], [1, 6, 2, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 2, 0, 0, 0, 0, 0, 0], [6, 2, 0, 0, 0, 0, 0, 0]]
    assert batch["response_mask"][0].tolist() == [True, True] + [False] * 6
    with pytest.raises(ValueError, match="exceeds seq_length"):
        collate_pairs([PreferencePair(0, [1, 3], [5, 5, 2], [6, 2])], seq_length=4, pad_id=0)


# --- order and batching -------------------------------------------------------------------------


def test_epoch_order_deterministic_and_varies():
    ds = PairDataset(_pairs(50), seed=3)
    order = ds.epoch_order(0)
    assert sorted(order) == list(range(50))
    assert PairDataset(_pairs(50), seed=3).epoch_order(0) == order
    assert ds.epoch_order(1) != order
    assert PairDataset(_pairs(50), seed=4).epoch_order(0) != order
    assert ds.epoch_order(0) == order  # asking for another epoch changes nothing


def test_batch_at_is_pure_and_drops_partial():
    ds = PairDataset(_pairs(10), seed=1)
    batches = PairBatches(ds, global_batch_size=3, seq_length=8, pad_id=0)
    assert batches.steps_per_epoch == 3  # 10 // 3: one pair per epoch is dropped
    sequential = [batches.batch_at(s) for s in range(9)]
    steps = list(range(9))
    random.Random(0).shuffle(steps)
    fresh = PairBatches(PairDataset(_pairs(10), seed=1), 3, 8, 0)
    shuffled = {s: fresh.batch_at(s) for s in steps}
    assert [shuffled[s] for s in range(9)] == sequential
    for epoch in range(3):
        got = [p.sample_id for s in range(3 * epoch, 3 * epoch + 3) for p in sequential[s][1]]
        assert all(sequential[s][0] == epoch for s in range(3 * epoch, 3 * epoch + 3))
        assert got == ds.epoch_order(epoch)[:9]  # epoch order, trailing partial batch dropped
    with pytest.raises(ValueError):
        PairBatches(ds, global_batch_size=11, seq_length=8, pad_id=0)


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("mbs", [1, 2])
def test_split_for_rank_union_is_global_batch(dp_size, mbs):
    global_batch = _pairs(8)
    parts = {r: split_for_rank(global_batch, r, dp_size, mbs) for r in range(dp_size)}
    for micro_batches in parts.values():
        assert len(micro_batches) == 8 // (mbs * dp_size)
        assert all(len(m) == mbs for m in micro_batches)
    ids = sorted(p.sample_id for ms in parts.values() for m in ms for p in m)
    assert ids == list(range(8))
    # Round-robin: global micro-batch k goes to rank k % dp_size.
    flat = [parts[k % dp_size][k // dp_size] for k in range(8 // mbs)]
    assert [p.sample_id for m in flat for p in m] == list(range(8))


def test_split_for_rank_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        split_for_rank(_pairs(6), 0, 2, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        split_for_rank(_pairs(4), 2, 2, 1)


def test_micro_batches_collates_rank_share():
    batches = PairBatches(PairDataset(_pairs(16), seed=0), global_batch_size=8, seq_length=6, pad_id=0)
    epoch, mbs = batches.micro_batches(step=3, dp_rank=1, dp_size=2, micro_batch_size=2)
    assert epoch == 1 and len(mbs) == 2
    _, pairs = batches.batch_at(3)
    expected = [p.sample_id for m in split_for_rank(pairs, 1, 2, 2) for p in m]
    assert [i for m in mbs for i in m["sample_ids"].tolist()] == expected
    assert all(m["tokens"].shape == (4, 6) for m in mbs)
