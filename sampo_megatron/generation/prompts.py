"""Prompts for generation: read from a file and tokenised exactly as the training data renders them."""

from __future__ import annotations

import json
import os

from ..data.encoding import PairEncoder
from ..data.tokenizer import Tokenizer


def read_prompts(path: str) -> list:
    """Prompts from a ``.jsonl`` file (a ``prompt`` field per line: a string or chat messages, as in
    the preference data; other fields are ignored) or a text file (one prompt per non-empty line).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON or has no ``prompt`` (naming file, line and field), or no
            prompts at all.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not path.endswith((".jsonl", ".json")):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not prompt:
                raise ValueError(f"{path}:{line_no}: field 'prompt' is missing or empty")
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def encode_prompts(prompts: list, tokenizer: Tokenizer, prompt_template: str = "auto") -> list[list[int]]:
    """Token ids of each prompt as the training pipeline encodes it: BOS, the rendered context, the
    assistant header (:class:`~sampo_megatron.data.encoding.PairEncoder`); the response follows."""
    encoder = PairEncoder(tokenizer, "generic", prompt_template)
    encoded = []
    for prompt in prompts:
        rendered = encoder.template.render(prompt)
        header = encoder.tokenizer.encode(rendered.header) if rendered.header else []
        ids = encoder.bos + encoder.tokenizer.encode(rendered.context) + header
        if not ids:
            raise ValueError(f"prompt {len(encoded)} is empty and the tokenizer adds no BOS: nothing to continue from")
        encoded.append(ids)
    return encoded
