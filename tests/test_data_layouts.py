"""Public layouts, file readers and prompt templates: each reads its fixture into the generic pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sampo_megatron.data import (
    DataOptions,
    Location,
    PairEncoder,
    detect_layout,
    get_template,
    load_pairs,
    load_tokenizer,
    truncate_pair,
)
from sampo_megatron.data.layouts import READERS, PreferenceText
from sampo_megatron.data.sources import RawItem

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "examples" / "data" / "tiny_tokenizer"
PAIRS_JSONL = ROOT / "examples" / "data" / "tiny_pairs.jsonl"
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Q1, A1, Q2 = "What is two plus two?", "Two plus two is four.", "What is two plus three?"
GOOD, BAD = "Two plus three is five.", "Two plus three is six."
TURNS = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
POST = dict(subreddit="homework", title="A question from class", post="What is one plus one?")
TLDR_PROMPT = "SUBREDDIT: r/homework\n\nTITLE: A question from class\n\nPOST: What is one plus one?\n\nTL;DR:"

# The canonical pairs, and the same pairs in each public layout.
GENERIC = [
    {"prompt": TURNS, "chosen": GOOD, "rejected": BAD},
    {"prompt": [{"role": "user", "content": Q1}], "chosen": A1, "rejected": "Two plus two is five."},
]
LAYOUT_FIXTURES = {
    "hh-rlhf": [
        {"chosen": f"\n\nHuman: {Q1}\n\nAssistant: {A1}\n\nHuman: {Q2}\n\nAssistant: {GOOD}",
         "rejected": f"\n\nHuman: {Q1}\n\nAssistant: {A1}\n\nHuman: {Q2}\n\nAssistant: {BAD}"},
        {"chosen": f"\n\nHuman: {Q1}\n\nAssistant: {A1}", "rejected": f"\n\nHuman: {Q1}\n\nAssistant: Two plus two is five."},
    ],
    "ultrafeedback": [
        {"prompt": Q1, "prompt_id": "a", "score_chosen": 9.0, "score_rejected": 2.0,
         "chosen": TURNS + [{"role": "assistant", "content": GOOD}], "rejected": TURNS + [{"role": "assistant", "content": BAD}]},
        {"prompt": Q1, "prompt_id": "b", "score_chosen": 9.0, "score_rejected": 2.0,
         "chosen": TURNS[:1] + [{"role": "assistant", "content": A1}],
         "rejected": TURNS[:1] + [{"role": "assistant", "content": "Two plus two is five."}]},
    ],
    # TRL's conversational form: the responses repeat the prompt's messages.
    "generic": [
        {"prompt": TURNS, "chosen": TURNS + [{"role": "assistant", "content": GOOD}], "rejected": [{"role": "assistant", "content": BAD}]},
        {"prompt": TURNS[:1], "chosen": [{"role": "assistant", "content": A1}], "rejected": "Two plus two is five."},
    ],
}  # fmt: skip
TLDR_FIXTURE = [
    {"info": POST, "summaries": [{"text": " One plus one is three. "}, {"text": "One plus one is two."}], "choice": 1},
    {"info": POST, "summaries": [{"text": "It is two."}, {"text": "It is one."}], "choice": 0},
]
TLDR_GENERIC = [
    {"prompt": TLDR_PROMPT, "chosen": "One plus one is two.", "rejected": "One plus one is three."},
    {"prompt": TLDR_PROMPT, "chosen": "It is two.", "rejected": "It is one."},
]


# Words of the layouts and chat markup the tiny tokenizer lacks; added so nothing becomes <unk> (which
# would hide a difference between two renderings).
MARKERS = ["Human", "Assistant", "System", "SUBREDDIT", "TITLE", "POST", "TL;DR", "r/homework", "Be brief",
           "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>",
           "<|user|>", "<|assistant|>", "system", "user", "assistant"]  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    hf.add_tokens(MARKERS)
    out = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(str(out))
    return load_tokenizer(str(out))


def no_unk(pairs, tok) -> bool:
    unk = tok.encode("<unk>")[0]
    return all(unk not in p.prompt_ids + p.chosen_ids + p.rejected_ids for p in pairs)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read(path, tok, **kw):
    pairs, log, _ = load_pairs(str(path), tok, DataOptions(seq_length=kw.pop("seq_length", 96), **kw))
    return list(pairs)


@pytest.mark.parametrize("layout", list(LAYOUT_FIXTURES))
def test_layout_reads_same_pairs_as_generic(tmp_path, tok, layout):
    fixture = write_jsonl(tmp_path / f"{layout}.jsonl", LAYOUT_FIXTURES[layout])
    generic = write_jsonl(tmp_path / "generic.jsonl", GENERIC)
    assert [READERS[layout](r) for r in LAYOUT_FIXTURES[layout]] == [READERS["generic"](r) for r in GENERIC]
    for template in ("plain", "chatml", "llama3", "tulu"):
        expected = read(generic, tok, data_format="generic", prompt_template=template)
        assert no_unk(expected, tok), template
        assert read(fixture, tok, data_format=layout, prompt_template=template) == expected, template
        assert read(fixture, tok, prompt_template=template) == expected, "auto-detected layout"
    # The plain template renders the HH-RLHF text itself: the prompt is the dialogue up to the last
    # "\n\nAssistant:" (the header, tokenised on its own), the response what follows it.
    (pair, _) = read(fixture, tok, prompt_template="plain")
    hh = LAYOUT_FIXTURES["hh-rlhf"][0]["chosen"]
    cut = hh.rfind("\n\nAssistant:")
    rendered = get_template("plain", tok).render(READERS["hh-rlhf"](LAYOUT_FIXTURES["hh-rlhf"][0]).prompt)
    assert rendered.context + rendered.header == hh[: cut + len("\n\nAssistant:")]
    assert pair.prompt_ids == [tok.bos_id] + tok.encode(hh[:cut]) + tok.encode("\n\nAssistant:")
    assert pair.chosen_ids == tok.encode(hh[cut + len("\n\nAssistant:") :]) + [tok.eos_id]


def test_tldr_reads_same_pairs_as_generic(tmp_path, tok):
    fixture = write_jsonl(tmp_path / "tldr.jsonl", TLDR_FIXTURE)
    generic = write_jsonl(tmp_path / "generic.jsonl", TLDR_GENERIC)
    assert [READERS["tldr"](r) for r in TLDR_FIXTURE] == [PreferenceText(**r) for r in TLDR_GENERIC]
    assert detect_layout(TLDR_FIXTURE[0]) == "tldr"
    assert read(fixture, tok) == read(generic, tok, data_format="generic") == read(fixture, tok, data_format="tldr")
    pairs = read(fixture, tok)
    assert pairs[0].prompt_ids == [tok.bos_id] + tok.encode(TLDR_PROMPT) and no_unk(pairs, tok)
    assert pairs[0].chosen_ids == tok.encode(" One plus one is two.") + [tok.eos_id]


def test_auto_detection_and_ambiguity(tmp_path, tok):
    assert detect_layout({"prompt": "a", "chosen": "b", "rejected": "c"}) == "generic"
    assert detect_layout(LAYOUT_FIXTURES["hh-rlhf"][0]) == "hh-rlhf"
    assert detect_layout(LAYOUT_FIXTURES["ultrafeedback"][0]) == "ultrafeedback"
    assert detect_layout({"chosen": "no dialogue markers", "rejected": "x"}) is None
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "good": "b", "bad": "c"}])
    with pytest.raises(ValueError, match=r"odd.jsonl:1: cannot tell the data layout .*--data-format"):
        read(odd, tok)


def _readers_fixture(tmp_path: Path, records: list) -> dict[str, Path]:
    """The same records as JSONL, a pretty-printed JSON array, JSON lines named .json, parquet, and
    datasets directories (a Dataset, and a DatasetDict read through its 'test' split)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records)}
    paths["json_array"] = tmp_path / "array.json"
    paths["json_array"].write_text(json.dumps(records, indent=2))
    paths["json_lines"] = write_jsonl(tmp_path / "lines.json", records)
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"], row_group_size=7)  # several row groups
    paths["datasets"] = tmp_path / "ds"
    datasets.Dataset.from_list(records).save_to_disk(str(paths["datasets"]))
    paths["datasets_dict"] = tmp_path / "dsd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records[:3]), "test": datasets.Dataset.from_list(records)}
    ).save_to_disk(str(paths["datasets_dict"]))
    return paths


@pytest.mark.parametrize("layout", ["generic", "ultrafeedback"])
def test_every_reader_gives_the_same_pairs(tmp_path, tok, layout):
    if layout == "generic":
        records = [json.loads(line) for line in PAIRS_JSONL.read_text().splitlines()[:40]]
    else:
        records = LAYOUT_FIXTURES["ultrafeedback"] * 10
    paths = _readers_fixture(tmp_path, records)
    expected = read(paths["jsonl"], tok, data_format=layout)
    assert len(expected) == len(records)
    for name, path in paths.items():
        split = "test" if name == "datasets_dict" else "train"
        assert read(path, tok, data_split=split) == expected, name


def test_locations_of_json_array_and_parquet_rows(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"prompt": Q1, "chosen": A1, "rejected": "Two plus two is five."}
    array = tmp_path / "a.json"
    array.write_text(json.dumps([good, good, {"prompt": Q1, "chosen": A1}], indent=2))
    with pytest.raises(ValueError, match=rf"^{array}:12: field 'rejected' is missing"):
        read(array, tok)
    table = pa.Table.from_pylist([good, good, {**good, "chosen": None}])
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'p.parquet'}: row 2: field 'chosen' is missing"):
        read(tmp_path / "p.parquet", tok)


def test_builtin_templates_render_expected_text(tok):
    messages = [{"role": "system", "content": "Be brief."}] + TURNS
    cases = {
        "plain": ("\n\nSystem: Be brief.\n\nHuman: " + Q1 + "\n\nAssistant: " + A1 + "\n\nHuman: " + Q2, "\n\nAssistant:"),
        "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + Q1 + "<|im_end|>\n<|im_start|>assistant\n"
                   + A1 + "<|im_end|>\n<|im_start|>user\n" + Q2 + "<|im_end|>\n", "<|im_start|>assistant\n"),
        "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                   + Q1 + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + A1
                   + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + Q2 + "<|eot_id|>",
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "tulu": ("<|system|>\nBe brief.\n<|user|>\n" + Q1 + "\n<|assistant|>\n" + A1 + "</s>\n<|user|>\n" + Q2 + "\n",
                 "<|assistant|>\n"),
    }  # fmt: skip
    for name, (context, header) in cases.items():
        rendered = get_template(name, tok).render(messages)
        assert (rendered.context, rendered.header) == (context, header), name
    plain = get_template("plain", tok)
    assert plain.render("Question: hi").context == "Question: hi" and plain.render("x").header == ""
    r = plain.render("Question: hi")
    assert plain.response(r, "Yes.") == " Yes." and plain.response(plain.render("Q: "), "Yes.") == "Yes."
    assert get_template("chatml", tok).render("hi").context == "<|im_start|>user\nhi<|im_end|>\n"  # string = one user turn
    assert get_template("auto", tok).name == "plain"  # the tiny tokenizer has no chat template
    with pytest.raises(ValueError, match="no chat_template"):
        get_template("tokenizer", tok)


def test_tokenizer_chat_template_and_protected_header(tmp_path, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.add_tokens(["user", "assistant"])
    hf.chat_template = CHATML_JINJA
    hf.save_pretrained(str(tmp_path / "chat_tok"))
    chat_tok = load_tokenizer(str(tmp_path / "chat_tok"))
    assert chat_tok.chat_template and get_template("auto", chat_tok).name == "tokenizer"
    own, builtin = get_template("tokenizer", chat_tok), get_template("chatml", chat_tok)
    assert own.render(TURNS) == builtin.render(TURNS)

    records = write_jsonl(tmp_path / "r.jsonl", [{"prompt": TURNS, "chosen": GOOD, "rejected": BAD}])
    (auto,) = read(records, chat_tok)
    assert auto == read(records, chat_tok, prompt_template="chatml")[0]
    header = chat_tok.encode("<|im_start|>assistant\n")
    assert auto.prompt_ids[-len(header) :] == header and len(chat_tok.encode("<|im_start|>")) == 1
    assert no_unk([auto], chat_tok)

    # Truncation keeps BOS in front and the whole header at the end, cutting the context between.
    encoder = PairEncoder(chat_tok, "generic", "tokenizer")
    enc = encoder.encode(RawItem(Location("x", "line", 1), {"prompt": TURNS, "chosen": GOOD, "rejected": BAD}))
    assert (enc.keep_prefix, enc.keep_suffix) == (1, len(header))
    seq = len(enc.chosen_ids) + len(header) + 3
    p, c, r = truncate_pair(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids, seq, enc.keep_prefix, enc.keep_suffix)
    assert p[0] == chat_tok.bos_id and p[-len(header) :] == header and len(p) == len(header) + 3
    assert c == enc.chosen_ids
