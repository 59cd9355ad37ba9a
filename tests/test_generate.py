"""Generation (sampo_megatron/generation, tools/generate.py) and the SFT loss.

References: plain-Python float64 sampling for the token choice, Hugging Face ``generate`` (greedy)
on the very model that was converted, and the TP=1 output for TP=2 and PP=2.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from sampo_megatron.generation import select_next_tokens, top_p_keep_mask, uniform_draws
from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss

from helpers import REPO_ROOT, make_hf_model, run_torchrun

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

TOKENIZER = REPO_ROOT / "examples" / "data" / "tiny_tokenizer"
PROMPTS = ["What is the opposite of fast?", "Please answer briefly. What is nine times four? Tell me more about it", "Hello",
           "What colour is the sky on a clear day?", "Name a day of the week."]  # fmt: skip
MAX_NEW = 12


def _reference_choice(logits: list[float], temperature: float, top_p: float, u: float) -> int:
    """Nucleus sampling by inverse CDF, written out in Python floats."""
    if temperature == 0:
        return max(range(len(logits)), key=lambda v: (logits[v], -v))
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    order = sorted(range(len(probs)), key=lambda v: (-probs[v], v))
    kept, mass = [], 0.0
    for v in order:
        if mass >= top_p:
            break
        kept.append(v)
        mass += probs[v]
    nucleus = sum(probs[v] for v in kept)
    running = 0.0
    for v in kept:
        running += probs[v]
        if running > u * nucleus:
            return v
    return kept[-1]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_token_choice_matches_a_plain_python_reference(temperature, top_p):
    rng = random.Random(0)
    logits = torch.tensor([[rng.gauss(0, 2) for _ in range(37)] for _ in range(64)], dtype=torch.float64)
    uniforms = uniform_draws(7, torch.arange(64), step=3)
    got = select_next_tokens(logits, temperature, top_p, uniforms)
    want = [_reference_choice(row.tolist(), temperature, top_p, float(u)) for row, u in zip(logits, uniforms)]
    assert got.tolist() == want


def test_sampling_frequencies_follow_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]], dtype=torch.float64).expand(20000, -1)
    draws = select_next_tokens(logits, 1.0, 0.8, uniform_draws(3, torch.arange(20000), step=0))
    probs = torch.softmax(logits[0], dim=0)
    # Nucleus at 0.8: the mass before each token (0, .61, .83, ...) is below 0.8 for the first two only.
    assert top_p_keep_mask(probs.unsqueeze(0), 0.8).tolist() == [[True, True, False, False, False]]
    expected = probs[:2] / probs[:2].sum()
    counts = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert counts[2:].sum() == 0
    assert torch.allclose(counts[:2], expected, atol=0.015)


def test_draws_are_uniform_and_keyed_by_prompt_and_step():
    u = uniform_draws(11, torch.arange(50000), step=0)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(uniform_draws(11, torch.tensor([5, 9]), 0), u[[5, 9]])  # batch-independent
    assert not torch.equal(uniform_draws(11, torch.arange(100), 1), u[:100])
    assert not torch.equal(uniform_draws(12, torch.arange(100), 0), u[:100])


def test_sft_loss_is_the_mean_nll_of_the_chosen_response():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(6, 10, generator=gen, dtype=torch.float64) * 3
    mask = torch.zeros(6, 10, dtype=torch.bool)
    for row, (start, stop) in enumerate([(2, 9), (1, 4), (3, 10), (2, 5), (1, 9), (4, 6)]):
        mask[row, start:stop] = True
    out = preference_loss(PreferenceInputs(logps, mask, torch.arange(3)), LossConfig(loss_type="sft"))
    want = [-(logps[i][mask[i]].sum() / mask[i].sum()).item() for i in range(3)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random tiny Llama (the shipped tokenizer's vocabulary) converted at TP=1."""
    from transformers import LlamaConfig

    from sampo_megatron.convert import convert_hf_to_megatron

    base = tmp_path_factory.mktemp("generate")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=96, vocab_size=403, bos_token_id=1, eos_token_id=2)  # fmt: skip
    hf_dir = make_hf_model(base / "hf", "llama2", config=config, seed=3)
    convert_hf_to_megatron(str(hf_dir), str(base / "ckpt"), tensor_model_parallel_size=1)
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return base


def _generate(base, name: str, nproc: int, *flags: str) -> list[dict]:
    out = base / f"{name}.jsonl"
    run_torchrun(REPO_ROOT / "tools" / "generate.py", nproc, "--load", str(base / "ckpt"), "--prompts", str(base / "prompts.jsonl"),
                 "--output", str(out), "--max-new-tokens", str(MAX_NEW), "--seq-length", "64", *flags)  # fmt: skip
    return [json.loads(line) for line in out.read_text().splitlines()]


def _hf_greedy(hf_dir) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from sampo_megatron.data import load_tokenizer
    from sampo_megatron.generation import encode_prompts

    tokenizer = load_tokenizer(str(TOKENIZER))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    texts = []
    for ids in encode_prompts(PROMPTS, tokenizer):
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.eos_id,
                             pad_token_id=tokenizer.pad_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long))  # fmt: skip
        new = out[0, len(ids) :].tolist()
        stopped = tokenizer.eos_id in new
        response = new[: new.index(tokenizer.eos_id)] if stopped else new
        texts.append({"response": tokenizer.decode(response), "num_tokens": len(response), "stopped_at_eos": stopped})
    return texts


def test_greedy_generation_is_the_same_at_tp1_tp2_pp2_and_equals_hugging_face(converted):
    """With megatron-core's key/value cache (the default) and without it (--no-kv-cache)."""
    tp1 = _generate(converted, "tp1", 1)
    tp2 = _generate(converted, "tp2", 2, "--tensor-model-parallel-size", "2", "--generation-batch-size", "2")
    pp2 = _generate(converted, "pp2", 2, "--pipeline-model-parallel-size", "2")
    assert [r["prompt"] for r in tp1] == PROMPTS
    assert tp2 == tp1 and pp2 == tp1
    assert [{k: v for k, v in r.items() if k != "prompt"} for r in tp1] == _hf_greedy(converted / "hf")
    for name, nproc, flags in (("tp1", 1, []), ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
                               ("pp2", 2, ["--pipeline-model-parallel-size", "2"])):  # fmt: skip
        assert _generate(converted, f"{name}_no_cache", nproc, "--no-kv-cache", *flags) == tp1, name


def test_sampled_generation_is_the_same_with_and_without_the_cache(converted):
    """A row's k-th token takes draw k on both paths, although with the cache rows of a batch start
    generating at different steps (prompts of different lengths)."""
    sampling = ["--temperature", "0.9", "--top-p", "0.95", "--generation-seed", "5"]
    cached = _generate(converted, "sampled", 1, *sampling)
    assert cached == _generate(converted, "sampled_no_cache", 1, "--no-kv-cache", *sampling)
    assert cached != _generate(converted, "tp1_greedy", 1)


def test_alpaca_eval_and_mt_bench_exports(converted):
    """AlpacaEval's model outputs against a written-out expected file; MT-Bench answers whose second
    turn is generated from the conversation with the model's own first answer."""
    plain = _generate(converted, "tp1_plain", 1)
    eval_set = converted / "alpaca_eval_set.json"
    eval_set.write_text(
        json.dumps([{"instruction": p, "output": "", "generator": "gpt4", "dataset": "helpful_base"} for p in PROMPTS])
    )
    out = converted / "alpaca_outputs.json"
    run_torchrun(REPO_ROOT / "tools" / "generate.py", 1, "--load", str(converted / "ckpt"), "--prompts", str(eval_set),
                 "--output", str(out), "--max-new-tokens", str(MAX_NEW), "--seq-length", "64", "--output-format", "alpaca_eval",
                 "--generator", "tiny-sampo")  # fmt: skip
    expected = [{"instruction": p, "output": r["response"], "generator": "tiny-sampo", "dataset": "helpful_base"}
                for p, r in zip(PROMPTS, plain)]  # fmt: skip
    written = json.loads(out.read_text())
    assert written == expected
    assert all(isinstance(r[k], str) for r in written for k in ("instruction", "output", "generator"))

    questions = converted / "question.jsonl"
    turns = [["What is the opposite of fast?", "And of slow?"], ["Name a day of the week.", "Another one?"]]
    questions.write_text(
        "".join(json.dumps({"question_id": 81 + i, "category": "writing", "turns": t}) + "\n" for i, t in enumerate(turns))
    )
    answers_file = converted / "mt_bench_answers.jsonl"
    run_torchrun(REPO_ROOT / "tools" / "generate.py", 1, "--load", str(converted / "ckpt"), "--prompts", str(questions),
                 "--output", str(answers_file), "--max-new-tokens", str(MAX_NEW), "--seq-length", "64", "--output-format", "mt_bench",
                 "--generator", "tiny-sampo")  # fmt: skip
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82] and all(a["model_id"] == "tiny-sampo" for a in answers)
    assert all(isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float) for a in answers)
    first = [a["choices"][0]["turns"][0] for a in answers]
    second = [a["choices"][0]["turns"][1] for a in answers]
    # both turns generated here from the explicit conversations (chat messages, as MT-Bench renders them)
    conversations = converted / "conversations.jsonl"
    user = [[{"role": "user", "content": t[0]}] for t in turns]
    follow_up = [
        [*u, {"role": "assistant", "content": a}, {"role": "user", "content": t[1]}] for u, a, t in zip(user, first, turns)
    ]
    conversations.write_text("".join(json.dumps({"prompt": m}) + "\n" for m in user + follow_up))
    explicit = converted / "explicit.jsonl"
    run_torchrun(REPO_ROOT / "tools" / "generate.py", 1, "--load", str(converted / "ckpt"), "--prompts", str(conversations),
                 "--output", str(explicit), "--max-new-tokens", str(MAX_NEW), "--seq-length", "64")  # fmt: skip
    assert first + second == [json.loads(x)["response"] for x in explicit.read_text().splitlines()]
