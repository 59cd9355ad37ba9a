"""The DPO workload of ``bench/vs_trl.py``, generated locally and seeded: a word-level tokenizer
(vocabulary exactly 8000), 48 preference pairs, a random-init Llama (4 layers, hidden 256), and its
conversion to a megatron-core checkpoint with the project's tool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Workload:
    """What the issue fixes; every field is recorded in the benchmark's JSON."""

    vocab_size: int = 8000
    num_layers: int = 4
    hidden_size: int = 256
    intermediate_size: int = 688
    num_heads: int = 8
    num_kv_heads: int = 4
    pairs: int = 48
    prompt_tokens: int = 64
    """Prompt length with the BOS token."""
    min_response: int = 100
    max_response: int = 400
    """Response words (one token each) before the EOS."""
    chosen_longer_fraction: float = 0.6
    max_length: int = 512
    seed: int = 0
    length_distribution: str = "uniform"
    """Response lengths: uniform in [min_response, max_response], or lognormal (median
    ``lognormal_median``, sigma 1, clipped to that range: a long tail, as real preference data)."""
    lognormal_median: int = 150


def response_lengths(work: Workload, rng: np.random.Generator) -> tuple[int, int]:
    """``(longer, shorter)`` response lengths of one pair."""
    if work.length_distribution == "uniform":
        a, b = sorted(int(x) for x in rng.integers(work.min_response, work.max_response + 1, size=2))
    elif work.length_distribution == "lognormal":
        drawn = rng.lognormal(np.log(work.lognormal_median), 1.0, size=2)
        a, b = sorted(int(np.clip(round(x), work.min_response, work.max_response)) for x in drawn)
    else:
        raise ValueError(f"unknown length_distribution {work.length_distribution!r}")
    return b, a


def _words(vocab_size: int) -> list[str]:
    return [f"w{i}" for i in range(vocab_size - len(SPECIALS))]


def build_tokenizer(work: Workload, out_dir: Path) -> None:
    """A ``tokenizers`` word-level tokenizer trained on generated text (every word once, then Zipf
    text), whitespace-split, BOS added by its post-processor; saved as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = _words(work.vocab_size)
    rng = np.random.default_rng(work.seed)
    zipf = rng.zipf(1.3, size=50_000) % len(words)
    corpus = [" ".join(words[i : i + 100]) for i in range(0, len(words), 100)]
    corpus += [" ".join(words[j] for j in zipf[i : i + 100]) for i in range(0, len(zipf), 100)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=work.vocab_size, special_tokens=SPECIALS))
    if tok.get_vocab_size() != work.vocab_size:
        raise RuntimeError(f"tokenizer vocabulary is {tok.get_vocab_size()}, expected {work.vocab_size}")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))


def build_pairs(work: Workload) -> list[dict]:
    """``pairs`` records ``{prompt, chosen, rejected}`` of generated words; the chosen response is the
    longer one in about ``chosen_longer_fraction`` of them. Responses start with a space, so that
    ``prompt + chosen`` (how TRL tokenizes) splits at the same place as prompt and chosen apart."""
    words = _words(work.vocab_size)
    rng = np.random.default_rng(work.seed + 1)

    def text(n: int) -> str:
        return " ".join(words[i] for i in rng.zipf(1.3, size=n) % len(words))

    records = []
    for _ in range(work.pairs):
        longer, shorter = response_lengths(work, rng)
        chosen_n, rejected_n = (longer, shorter) if rng.random() < work.chosen_longer_fraction else (shorter, longer)
        records.append(
            {"prompt": text(work.prompt_tokens - 1), "chosen": " " + text(chosen_n), "rejected": " " + text(rejected_n)}
        )
    return records


def build_hf_model(work: Workload, out_dir: Path) -> None:
    """Random-init ``LlamaForCausalLM`` (fp32, untied embeddings), seeded, saved with safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=work.vocab_size,
        hidden_size=work.hidden_size,
        intermediate_size=work.intermediate_size,
        num_hidden_layers=work.num_layers,
        num_attention_heads=work.num_heads,
        num_key_value_heads=work.num_kv_heads,
        max_position_embeddings=work.max_length,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(work.seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(str(out_dir), safe_serialization=True)


def build(work: Workload, root: Path) -> dict[str, str]:
    """Write tokenizer, pairs (``pairs.jsonl``), HF model and the converted megatron checkpoint under
    ``root`` (reused when ``root/workload.json`` says the same workload is already there).

    Returns:
        Paths: ``tokenizer``, ``pairs``, ``hf_model``, ``megatron``.
    """
    paths = {k: str(root / k) for k in ("tokenizer", "hf_model", "megatron")}
    paths["pairs"] = str(root / "pairs.jsonl")
    marker = root / "workload.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(work):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    build_tokenizer(work, Path(paths["tokenizer"]))
    with open(paths["pairs"], "w") as f:
        for record in build_pairs(work):
            f.write(json.dumps(record) + "\n")
    build_hf_model(work, Path(paths["hf_model"]))
    shutil.copytree(paths["tokenizer"], paths["hf_model"], dirs_exist_ok=True)  # the converter takes it along
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", paths["hf_model"],
         "--save", paths["megatron"], "--tensor-model-parallel-size", "1"],
        check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    marker.write_text(json.dumps(asdict(work)))
    return paths
