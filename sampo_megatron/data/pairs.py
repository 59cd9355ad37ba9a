"""Preference pairs from JSONL: reading, validation, tokenisation and truncation.

Each line of the file is a JSON object with string fields ``prompt``, ``chosen`` and ``rejected``
(other fields are ignored; blank lines are skipped). A pair is tokenised as

- prompt   = ``[BOS]`` (when the tokenizer has one and ``add_bos``) + tokens of ``prompt``
- response = tokens of the response + ``[EOS]``

and both sequences ``prompt + chosen`` and ``prompt + rejected`` are made to fit ``seq_length``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .tokenizer import Tokenizer

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    """One tokenised preference pair; chosen and rejected share the prompt."""

    sample_id: int
    """0-based index of the record in its file (blank lines not counted); keys SamPO's seeds and the
    reference-log-prob cache, so it must not depend on shuffling."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    seq_length: int,
    keep_prefix: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Makes ``prompt + chosen`` and ``prompt + rejected`` each fit ``seq_length`` tokens.

    The prompt is shared, so it is cut for the longer response: first it loses tokens from the LEFT
    (its end, next to the response, matters most), down to one token; only if a response still does
    not fit is that response cut from the RIGHT (keeping its start; it then has no EOS).

    Args:
        prompt_ids: Prompt tokens, BOS included.
        chosen_ids: Chosen response tokens, EOS included.
        rejected_ids: Rejected response tokens, EOS included.
        seq_length: Maximum tokens per sequence; at least 2 (one prompt token, one response token).
        keep_prefix: Leading prompt tokens that left truncation must keep (1 to keep a BOS); they
            still count towards the one-token minimum, so with a BOS a prompt may shrink to the BOS.

    Returns:
        ``(prompt_ids, chosen_ids, rejected_ids)``, truncated copies.
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2 (one prompt and one response token), got {seq_length}")
    longest = max(len(chosen_ids), len(rejected_ids))
    prompt_budget = max(1, seq_length - longest)
    if len(prompt_ids) > prompt_budget:
        keep_prefix = min(keep_prefix, prompt_budget)
        tail = prompt_budget - keep_prefix
        # tail may be 0 (then the prompt is just its kept prefix); [-0:] would keep everything.
        prompt_ids = prompt_ids[:keep_prefix] + (prompt_ids[len(prompt_ids) - tail :] if tail else [])
    response_budget = seq_length - len(prompt_ids)
    return list(prompt_ids), list(chosen_ids[:response_budget]), list(rejected_ids[:response_budget])


def tokenize_pair(
    record: dict,
    tokenizer: Tokenizer,
    seq_length: int,
    sample_id: int,
    where: str = "<record>",
    add_bos: bool = True,
) -> PreferencePair:
    """Validates, tokenises and truncates one record.

    Args:
        record: The decoded JSON object.
        tokenizer: Tokenizer from :func:`~sampo_megatron.data.tokenizer.load_tokenizer`.
        seq_length: Maximum tokens per sequence (prompt + response).
        sample_id: Id stored in the pair.
        where: ``"file:line"`` prefix for error messages.
        add_bos: Put the tokenizer's BOS in front of the prompt, when it has one.

    Raises:
        ValueError: a field is missing, not a string, or a response (or, without BOS, the prompt)
            is empty; the message starts with ``where`` and names the field.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {FIELDS}, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise ValueError(f"{where}: field '{field}' is missing")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompt_ids = bos + tokenizer.encode(record["prompt"])
    if not prompt_ids:
        # Without any prompt token there is no position from which to predict the first response token.
        raise ValueError(f"{where}: field 'prompt' is empty and the tokenizer adds no BOS")
    responses = []
    for field in ("chosen", "rejected"):
        ids = tokenizer.encode(record[field]) if record[field].strip() else []
        if not ids:
            # An EOS-only response would be trained on as a real answer; refuse it instead.
            raise ValueError(f"{where}: field '{field}' is empty")
        responses.append(ids + [tokenizer.eos_id])
    prompt_ids, chosen_ids, rejected_ids = truncate_pair(
        prompt_ids, responses[0], responses[1], seq_length, keep_prefix=len(bos)
    )
    return PreferencePair(sample_id, prompt_ids, chosen_ids, rejected_ids)


def read_pairs_jsonl(
    path: str, tokenizer: Tokenizer, seq_length: int, add_bos: bool = True
) -> list[PreferencePair]:
    """Reads and tokenises a JSONL file of preference pairs.

    Args:
        path: JSONL file, one ``{"prompt": str, "chosen": str, "rejected": str}`` object per line.
        tokenizer: Tokenizer from :func:`~sampo_megatron.data.tokenizer.load_tokenizer`.
        seq_length: Maximum tokens per sequence; see :func:`truncate_pair` for how pairs are cut.
        add_bos: Put the tokenizer's BOS in front of every prompt, when it has one.

    Returns:
        The pairs in file order, ``sample_id`` = 0-based record index.

    Raises:
        ValueError: on the first bad record, e.g. ``"pairs.jsonl:17: field 'chosen' is missing"``;
            bad records are never skipped silently.
    """
    name = os.fspath(path)
    pairs: list[PreferencePair] = []
    with open(name, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            pairs.append(tokenize_pair(record, tokenizer, seq_length, len(pairs), where, add_bos))
    return pairs
