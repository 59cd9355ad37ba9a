"""Bad input: with ``error`` the message names file, line and field; with ``skip`` the record is
dropped, counted by reason, and the rest is read exactly as if it had never been there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sampo_megatron.data import BadRecord, DataOptions, load_pairs, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "examples" / "data" / "tiny_tokenizer"
GOOD = [
    {"prompt": "What is one plus one?", "chosen": "One plus one is two.", "rejected": "One plus one is three."},
    {"prompt": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is green."},
    {"prompt": "What comes after Monday?", "chosen": "Tuesday comes after Monday.", "rejected": "Friday."},
    {"prompt": "How many legs does a cat have?", "chosen": "A cat has four legs.", "rejected": "A cat has six legs."},
]
LONG = " ".join(["A cat has four legs."] * 6)  # 36 tokens: more than fits next to any prompt at seq 16


def _last_word() -> str:
    """The word with the tiny tokenizer's highest id (a model one id smaller cannot embed it)."""
    vocab = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    return max(vocab, key=vocab.get).lstrip("\u2581")


OOV_WORD = _last_word()
SEQ, MIN_RESPONSE = 16, 16  # every GOOD pair fits whole; --min-response-tokens 16 forbids cutting a response


def line(record) -> bytes:
    return record if isinstance(record, bytes) else json.dumps(record).encode()


# name: (bad line, reason, field or None)
CASES = {
    "malformed_json": (b'{"prompt": "hi", "chosen": "yes"', "malformed_json", None),
    "not_an_object": (b'["hi", "yes", "no"]', "wrong_type", None),
    "missing_field": ({"prompt": "hi", "rejected": "no"}, "missing_field", "chosen"),
    "mistyped_field": ({"prompt": "hi", "chosen": "yes", "rejected": 3}, "wrong_type", "rejected"),
    "mistyped_message": ({"prompt": [{"role": "user", "content": 5}], "chosen": "yes", "rejected": "no"}, "wrong_type",
                         "prompt[0].content"),
    "unknown_role": ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "yes", "rejected": "no"}, "wrong_type",
                     "prompt[0].role"),
    "empty_response": ({"prompt": "hi", "chosen": "yes", "rejected": "  \n"}, "empty_response", "rejected"),
    "identical": ({"prompt": "hi", "chosen": "It is blue.", "rejected": "It  is blue."}, "identical_responses", "rejected"),
    "no_room": ({"prompt": "What color is the sky?", "chosen": LONG, "rejected": "Blue."}, "no_room_for_response", "chosen"),
    "invalid_utf8": (b'{"prompt": "hi", "chosen": "caf\xc3\x28 au lait", "rejected": "no"}', "invalid_utf8", "chosen"),
    "lone_surrogate": (b'{"prompt": "hi \\udc80", "chosen": "yes", "rejected": "no"}', "invalid_utf8", "prompt"),
    "bad_utf8_outside_strings": (b'{"prompt": "hi", "chosen": "yes", "rejected": "no"}\xff', "invalid_utf8", None),
    "mismatched_conversation": ({"prompt": "hi", "chosen": [{"role": "user", "content": "other"},
                                 {"role": "assistant", "content": "yes"}], "rejected": "no"}, "mismatched_prompt", "chosen"),
    "out_of_vocab": ({"prompt": "hi", "chosen": f"It is blue. {OOV_WORD}", "rejected": "It is green."}, "token_out_of_vocab",
                     "chosen"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def model_vocab(tok) -> int:
    """A model vocabulary one id short of the tokenizer's; the out_of_vocab case uses that last id."""
    assert tok.encode(OOV_WORD) == [tok.vocab_size - 1]
    return tok.vocab_size - 1


def options(mode: str, model_vocab: int) -> DataOptions:
    return DataOptions(SEQ, on_bad_record=mode, min_response_tokens=MIN_RESPONSE, model_vocab_size=model_vocab)


def write(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join(line(r) + b"\n" for r in lines))
    return path


def test_good_records_fit_and_stay_below_the_model_vocabulary(tok, model_vocab):
    ids = [i for r in GOOD for f in ("prompt", "chosen", "rejected") for i in tok.encode(r[f])]
    assert max(ids) < model_vocab < tok.vocab_size
    for r in GOOD:
        assert 1 + len(tok.encode(r["prompt"])) + 1 + max(len(tok.encode(" " + r[k])) for k in ("chosen", "rejected")) <= SEQ


@pytest.mark.parametrize("case", list(CASES))
def test_error_names_file_line_field(tmp_path, tok, model_vocab, case):
    bad, reason, field = CASES[case]
    path = write(tmp_path / "pairs.jsonl", [GOOD[0], b"", GOOD[1], bad, GOOD[2]])  # line 4
    with pytest.raises(BadRecord) as info:
        load_pairs(str(path), tok, options("error", model_vocab))
    text = str(info.value)
    assert text.startswith(f"{path}:4: "), text
    assert info.value.reason == reason and f"[{reason}]" in text
    if field is not None:
        assert f"field '{field}'" in text, text


@pytest.mark.parametrize("case", list(CASES))
def test_skip_drops_and_counts(tmp_path, tok, model_vocab, case):
    bad, reason, _ = CASES[case]
    path = write(tmp_path / "pairs.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2], GOOD[3]])
    clean = write(tmp_path / "clean.jsonl", GOOD)
    pairs, log, _ = load_pairs(str(path), tok, options("skip", model_vocab))
    assert dict(log.counts) == {reason: 1}
    expected, clean_log, _ = load_pairs(str(clean), tok, options("skip", model_vocab))
    assert list(pairs) == list(expected) and clean_log.total == 0  # sample ids 0..3, as without the bad line


def test_skip_counts_every_reason_at_once(tmp_path, tok, model_vocab):
    lines = [GOOD[i % 4] if i % 2 == 0 else bad for i, (bad, _, _) in enumerate(CASES.values())]
    lines += [CASES["identical"][0], CASES["no_room"][0]]
    path = write(tmp_path / "mixed.jsonl", lines)
    pairs, log, _ = load_pairs(str(path), tok, options("skip", model_vocab))
    expected = {}
    for i, (_, reason, _) in enumerate(CASES.values()):
        if i % 2:
            expected[reason] = expected.get(reason, 0) + 1
    expected["identical_responses"] = expected.get("identical_responses", 0) + 1
    expected["no_room_for_response"] = expected.get("no_room_for_response", 0) + 1
    assert dict(log.counts) == expected
    assert [p.sample_id for p in pairs] == list(range(len(pairs))) and len(pairs) == len(lines) - sum(expected.values())
    summary = log.summary(len(pairs))
    assert f"{log.total} bad records skipped" in summary
    for reason in expected:
        assert f"  {reason}: {expected[reason]} (" in summary


def test_truncatable_prompts_are_not_bad(tmp_path, tok):
    """A long prompt is cut from the left (as before); only a response that cannot fit is a problem."""
    long_prompt = " ".join(["What is one plus one?"] * 10)
    path = write(tmp_path / "p.jsonl", [{"prompt": long_prompt, "chosen": "It is two.", "rejected": "It is three."}])
    (pair,) = load_pairs(str(path), tok, DataOptions(SEQ, min_response_tokens=MIN_RESPONSE))[0]
    assert pair.prompt_ids[0] == tok.bos_id and len(pair.prompt_ids) + len(pair.chosen_ids) == SEQ
    assert tok.decode(pair.prompt_ids[1:]).endswith("one plus one?")
    # With the default --min-response-tokens 1 an over-long response is cut from the right instead.
    path = write(tmp_path / "r.jsonl", [CASES["no_room"][0]])
    (pair,) = load_pairs(str(path), tok, DataOptions(SEQ))[0]
    assert len(pair.prompt_ids) == 1 and len(pair.chosen_ids) == SEQ - 1


def test_no_room_when_the_protected_prompt_fills_the_sequence(tmp_path, tok):
    """With a chat prompt, BOS + the assistant header are protected: a sequence that holds only them
    leaves no room even for one response token."""
    record = {"prompt": [{"role": "user", "content": "What is one plus one?"}], "chosen": "Two.", "rejected": "Three."}
    path = write(tmp_path / "c.jsonl", [record])
    header = len(tok.encode("\n\nAssistant:"))
    (pair,) = load_pairs(str(path), tok, DataOptions(1 + header + 1))[0]
    assert pair.prompt_ids == [tok.bos_id] + tok.encode("\n\nAssistant:") and len(pair.chosen_ids) == 1
    with pytest.raises(BadRecord, match=r"c.jsonl:1: field 'chosen' keeps 0 of its \d+ tokens"):
        load_pairs(str(path), tok, DataOptions(1 + header))


def test_malformed_json_array_cannot_be_skipped(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_text("[\n  " + json.dumps(GOOD[0]) + ',\n  {"prompt": "hi", "chosen": \n]\n')
    for mode in ("error", "skip"):  # the parser stops at the ']' on line 4
        with pytest.raises(BadRecord, match=rf"{path}:4: malformed JSON.*cannot be located"):
            load_pairs(str(path), tok, DataOptions(SEQ, on_bad_record=mode))
