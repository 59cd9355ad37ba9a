"""Preprocessing into megatron-core indexed datasets: same pairs and bitwise-identical batches as the
raw file, any number of workers, bad records, statistics and the long/short split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sampo_megatron.data import BadRecord, DataOptions, PairBatches, PairDataset, load_pairs, load_tokenizer
from sampo_megatron.data.indexed import IndexedPairs, read_metadata
from sampo_megatron.data.preprocess import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TOKENIZER_DIR = DATA / "tiny_tokenizer"
PAIRS = DATA / "tiny_pairs.jsonl"
BIASED = DATA / "length_bias_pairs.jsonl"
SUFFIXES = ("_prompt.bin", "_prompt.idx", "_chosen.bin", "_chosen.idx", "_rejected.bin", "_rejected.idx",
            "_sample.bin", "_sample.idx")  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER_DIR))


def run(input_path, prefix, **kw) -> dict:
    kw.setdefault("progress", False)
    return preprocess(PreprocessConfig(str(input_path), str(prefix), str(TOKENIZER_DIR), **kw))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[int, Path]:
    """tiny_pairs.jsonl preprocessed with 1 and with 2 workers."""
    out = tmp_path_factory.mktemp("indexed")
    return {w: (run(PAIRS, out / f"w{w}" / "tiny", workers=w, chunk_size=16), out / f"w{w}" / "tiny")[1] for w in (1, 2)}


def test_workers_write_identical_files(prepared):
    for suffix in SUFFIXES:
        one, two = (Path(f"{prepared[w]}{suffix}").read_bytes() for w in (1, 2))
        assert one == two, suffix
    meta = read_metadata(str(prepared[2]))
    assert meta["num_pairs"] == 256 and meta["layout"] == "generic" and meta["prompt_template"] == "plain"
    assert meta["token_dtype"] == "uint16" and meta["sample_fields"][0] == "sample_id"
    assert read_metadata(str(prepared[2]) + ".json")["prefix"] == str(prepared[2])  # the .json path works too
    assert read_metadata(str(PAIRS)) is None


@pytest.mark.parametrize("seq_length", [32, 96])  # 32 cuts many prompts and responses
def test_indexed_equals_raw_bitwise(prepared, tok, seq_length):
    options = DataOptions(seq_length)
    raw, _, raw_source = load_pairs(str(PAIRS), tok, options)
    indexed, _, indexed_source = load_pairs(str(prepared[2]), tok, options)
    assert isinstance(indexed, IndexedPairs) and "indexed dataset" in indexed_source and "tokenised now" in raw_source
    assert list(indexed) == raw
    for dp_size, mbs in ((1, 4), (2, 2)):
        a = PairBatches(PairDataset(raw, seed=7), 16, seq_length, tok.pad_id)
        b = PairBatches(PairDataset(indexed, seed=7), 16, seq_length, tok.pad_id)
        for step in range(2 * a.steps_per_epoch):  # two epochs: two shuffles
            for rank in range(dp_size):
                ea, ma = a.micro_batches(step, rank, dp_size, mbs)
                eb, mb = b.micro_batches(step, rank, dp_size, mbs)
                assert ea == eb and len(ma) == len(mb)
                for x, y in zip(ma, mb):
                    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_records_skipped_alike_in_both_paths(tmp_path, tok):
    good = [json.loads(line) for line in PAIRS.read_text().splitlines()[:12]]
    lines = [json.dumps(r) for r in good]
    lines.insert(3, '{"prompt": "hi", "chosen": "It is blue."')  # malformed
    lines.insert(7, json.dumps({**good[0], "rejected": good[0]["chosen"]}))  # identical
    lines.insert(9, json.dumps({**good[1], "chosen": " ".join([good[1]["chosen"]] * 8)}))  # no room at 96 (min 96)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = run(path, tmp_path / "ix" / "bad", on_bad_record="skip")
    assert summary["bad_records"]["by_reason"] == {"identical_responses": 1, "malformed_json": 1}
    assert summary["pairs"] == 13  # the over-long one is only bad at a given --seq-length
    options = DataOptions(96, on_bad_record="skip", min_response_tokens=96)
    raw, raw_log, _ = load_pairs(str(path), tok, options)
    indexed, indexed_log, _ = load_pairs(str(tmp_path / "ix" / "bad"), tok, options)
    assert list(indexed) == raw and len(raw) == 12
    assert dict(raw_log.counts) == {"identical_responses": 1, "malformed_json": 1, "no_room_for_response": 1}
    assert dict(indexed_log.counts) == {"no_room_for_response": 1}  # the others never got into the dataset
    # With error, the indexed path names the source line and field too.
    with pytest.raises(BadRecord, match=rf"^{path}:10: field 'chosen' keeps \d+ of its \d+ tokens.*pair 7 of indexed"):
        load_pairs(str(tmp_path / "ix" / "bad"), tok, DataOptions(96, min_response_tokens=96))
    # ... and preprocessing with error stops at the first bad line without leaving a dataset behind.
    with pytest.raises(BadRecord, match=rf"^{path}:4: malformed JSON"):
        run(path, tmp_path / "ix2" / "bad", workers=2, chunk_size=2)
    assert read_metadata(str(tmp_path / "ix2" / "bad")) is None
    # --seq-length at preprocessing applies the length checks then.
    summary = run(path, tmp_path / "ix3" / "bad", on_bad_record="skip", seq_length=96, min_response_tokens=96)
    assert summary["pairs"] == 12 and summary["bad_records"]["by_reason"]["no_room_for_response"] == 1


def test_indexed_with_another_tokenizer_is_refused(prepared, tmp_path, tok):
    import sentencepiece as spm

    lines = [r[k] for r in map(json.loads, PAIRS.read_text().splitlines()) for k in ("prompt", "chosen")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", num_threads=1, minloglevel=2)  # fmt: skip
    other = load_tokenizer(str(tmp_path / "sp.model"))
    for mode in ("error", "skip"):  # a different tokenizer is a set-up error, not a bad record
        with pytest.raises(ValueError, match=rf"{prepared[1]}.json: field 'tokenizer': the dataset was tokenised with"):
            load_pairs(str(prepared[1]), other, DataOptions(96, on_bad_record=mode))


def test_out_of_vocab_ids_in_indexed_data(prepared, tok):
    """Ids at or above the model's vocabulary are caught from the indexed data as from raw files."""
    vocab = 300  # some of the tiny pairs use ids above it
    raw, raw_log, _ = load_pairs(str(PAIRS), tok, DataOptions(96, on_bad_record="skip", model_vocab_size=vocab))
    indexed, log, _ = load_pairs(str(prepared[1]), tok, DataOptions(96, on_bad_record="skip", model_vocab_size=vocab))
    assert list(indexed) == raw and log.counts == raw_log.counts and 0 < log.counts["token_out_of_vocab"] < 256


def test_split_by_length_and_statistics(tmp_path, tok):
    prefix = tmp_path / "bias" / "pairs"
    summary = run(BIASED, prefix, workers=2, split_by_length=("long", "short"), seq_length=48)
    full, _, _ = load_pairs(str(prefix), tok, DataOptions(512))
    long, _, _ = load_pairs(str(prefix) + "_long", tok, DataOptions(512))
    short, _, _ = load_pairs(str(prefix) + "_short", tok, DataOptions(512))
    assert all(len(p.chosen_ids) > len(p.rejected_ids) for p in long)
    assert all(len(p.chosen_ids) < len(p.rejected_ids) for p in short)
    ties = sum(len(p.chosen_ids) == len(p.rejected_ids) for p in full)
    assert len(long) + len(short) + ties == len(full) == 256
    assert [p.sample_id for p in long] == list(range(len(long)))  # each subset is a dataset of its own
    by_text = {(tuple(p.prompt_ids), tuple(p.chosen_ids)) for p in full}
    assert all((tuple(p.prompt_ids), tuple(p.chosen_ids)) in by_text for p in list(long) + list(short))

    report = json.loads(Path(summary["stats"]).read_text())
    assert report["num_pairs"] == 256 and report["chosen_longer_share"] == pytest.approx(len(long) / 256)
    assert 0.85 <= report["chosen_longer_share"] <= 0.95  # the shipped set's length bias (0.9 in words)
    assert report["mean_T_w"] == pytest.approx(sum(len(p.chosen_ids) for p in full) / 256)
    assert report["mean_T_l"] == pytest.approx(sum(len(p.rejected_ids) for p in full) / 256)
    assert report["truncated_to_seq_length"]["seq_length"] == 48
    assert report["subsets"]["long"]["chosen_longer_share"] == 1.0 and report["subsets"]["short"]["chosen_longer_share"] == 0.0
    hist = report["histogram"]
    assert sum(hist["chosen"]) == sum(hist["rejected"]) == 256 and len(hist["edges"]) == len(hist["prompt"]) + 1
    assert Path(summary["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_tool(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_tool", ROOT / "tools" / "preprocess_preference_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    hh = tmp_path / "hh.jsonl"
    records = [json.loads(line) for line in PAIRS.read_text().splitlines()[:16]]
    hh.write_text("".join(json.dumps({k: f"\n\nHuman: {r['prompt']}\n\nAssistant: {r[k]}" for k in ("chosen", "rejected")}) + "\n"
                          for r in records))  # fmt: skip
    assert tool.main(["--input", str(hh), "--output-prefix", str(tmp_path / "hh"), "--tokenizer-model", str(TOKENIZER_DIR),
                      "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "16 pairs, no bad records" in out and json.loads(out.strip().splitlines()[-1])["pairs"] == 16
    assert read_metadata(str(tmp_path / "hh"))["layout"] == "hh-rlhf"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    args = ["--input", str(bad), "--output-prefix", str(tmp_path / "b"), "--tokenizer-model", str(TOKENIZER_DIR), "--no-progress"]
    assert tool.main(args) == 1
    assert f"{bad}:1: field 'chosen' is missing" in capsys.readouterr().err


@pytest.mark.parametrize("split_by_length", [(), ("long", "short")])
def test_tied_pairs_are_written_once(tmp_path, tok, split_by_length):
    """A pair whose responses have equal token counts (a tie) belongs to the whole set once and to
    neither long/short subset: the indexed set equals the raw file pair for pair."""
    records = [json.loads(line) for line in PAIRS.read_text().splitlines()[:40]]
    for record in records[::2]:  # every other pair: the chosen words in reverse order, usually a tie
        record["rejected"] = " ".join(reversed(record["chosen"].split()))
    source = tmp_path / "ties.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw, _, _ = load_pairs(str(source), tok, DataOptions(512))
    ties = sum(len(p.chosen_ids) == len(p.rejected_ids) for p in raw)
    assert ties >= 10, "the test data should hold ties"

    prefix = tmp_path / "ties"
    summary = run(source, prefix, workers=1, split_by_length=split_by_length)
    indexed, _, _ = load_pairs(str(prefix), tok, DataOptions(512))
    assert summary["pairs"] == len(indexed) == len(raw) == 40
    assert list(indexed) == raw  # same pairs, same sample ids
    report = json.loads(Path(summary["stats"]).read_text())
    assert report["num_pairs"] == 40 and report["tie_share"] == pytest.approx(ties / 40)
    if split_by_length:
        long, _, _ = load_pairs(str(prefix) + "_long", tok, DataOptions(512))
        short, _, _ = load_pairs(str(prefix) + "_short", tok, DataOptions(512))
        assert len(long) + len(short) + ties == 40
        assert report["subsets"]["long"]["num_pairs"] == len(long) and report["subsets"]["short"]["num_pairs"] == len(short)
