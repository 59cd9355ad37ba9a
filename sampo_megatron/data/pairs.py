"""Tokenised preference pairs: the untruncated form, truncation to ``seq_length``, and the checks
that depend on ``seq_length`` and on the model.

A pair is tokenised (by :mod:`~sampo_megatron.data.encoding`) as

- prompt   = ``[BOS]`` (when the tokenizer has one and ``add_bos``) + context tokens + header tokens
- response = tokens of the response + ``[EOS]``

and kept in that untruncated form (:class:`EncodedPair`) by the raw reader and in the indexed
dataset alike; :func:`finalize_pair` then makes it fit ``seq_length``. Both paths share this one
function, which is why they give identical batches.

Truncation keeps the end of the prompt. The prompt can shrink down to its *protected* part: the BOS
(kept in front) and the template's assistant header (kept at the end), at least one token. A pair
has no room for a response when, even with the prompt at that minimum, a response would keep fewer
than ``min(min_response_tokens, its length)`` tokens (``--min-response-tokens``, default 1: some of
each response must fit).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadRecord, Location


@dataclass
class PreferencePair:
    """One tokenised preference pair, fitted to ``seq_length``; chosen and rejected share the prompt."""

    sample_id: int
    """0-based index among the pairs kept from the data (blank lines and skipped bad records not
    counted); keys SamPO's seeds and the reference-log-prob cache, so it must not depend on shuffling."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class EncodedPair:
    """A pair as tokenised, before truncation."""

    prompt_ids: list[int]
    """BOS (if any) + context + header."""
    chosen_ids: list[int]
    """Chosen response + EOS."""
    rejected_ids: list[int]
    """Rejected response + EOS."""
    keep_prefix: int = 0
    """Leading prompt tokens truncation keeps (the BOS)."""
    keep_suffix: int = 0
    """Trailing prompt tokens truncation keeps (the template's assistant header)."""


def truncation_plan(
    prompt_len: int, chosen_len: int, rejected_len: int, seq_length: int, keep_prefix: int = 0, keep_suffix: int = 0
) -> tuple[int, int, int]:
    """Kept token counts ``(prompt, chosen, rejected)`` so that each ``prompt + response`` fits.

    The prompt is shared, so it is cut for the longer response: first from the LEFT, down to its
    protected part (``keep_prefix + keep_suffix`` tokens, at least 1); only if a response still does
    not fit is it cut from the RIGHT (keeping its start; it then has no EOS). A response count may
    come out <= 0 when the protected prompt alone fills ``seq_length``.
    """
    protected = max(1, keep_prefix + keep_suffix)
    longest = max(chosen_len, rejected_len)
    prompt_keep = min(prompt_len, max(protected, seq_length - longest))
    budget = seq_length - prompt_keep
    return prompt_keep, min(chosen_len, budget), min(rejected_len, budget)


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    seq_length: int,
    keep_prefix: int = 0,
    keep_suffix: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Makes ``prompt + chosen`` and ``prompt + rejected`` each fit ``seq_length`` tokens.

    See :func:`truncation_plan`.

    Args:
        prompt_ids: Prompt tokens, BOS and header included.
        chosen_ids: Chosen response tokens, EOS included.
        rejected_ids: Rejected response tokens, EOS included.
        seq_length: Maximum tokens per sequence; at least 2 (one prompt token, one response token).
        keep_prefix: Leading prompt tokens left truncation keeps (1 to keep a BOS).
        keep_suffix: Trailing prompt tokens that must survive (the assistant header). The tail is
            kept anyway; this only stops the prompt from shrinking below prefix + suffix.

    Returns:
        ``(prompt_ids, chosen_ids, rejected_ids)``, truncated copies.
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2 (one prompt and one response token), got {seq_length}")
    p, c, r = truncation_plan(len(prompt_ids), len(chosen_ids), len(rejected_ids), seq_length, keep_prefix, keep_suffix)
    if p < len(prompt_ids):
        head = min(keep_prefix, p)
        tail = p - head
        # tail may be 0 (then the prompt is just its kept prefix); [-0:] would keep everything.
        prompt_ids = prompt_ids[:head] + (prompt_ids[len(prompt_ids) - tail :] if tail else [])
    return list(prompt_ids), list(chosen_ids[: max(c, 0)]), list(rejected_ids[: max(r, 0)])


def room_problem(
    pair_lengths: tuple[int, int, int], seq_length: int, keep_prefix: int, keep_suffix: int, min_response_tokens: int
) -> tuple[str, str] | None:
    """``(detail, field)`` saying why a pair with these untruncated lengths has no room for a
    response, e.g. ``("keeps 0 of its 37 tokens: ...", "chosen")``; ``None`` when it has room."""
    p, c, r = truncation_plan(*pair_lengths, seq_length, keep_prefix, keep_suffix)
    for field, full, kept in (("chosen", pair_lengths[1], c), ("rejected", pair_lengths[2], r)):
        if kept < min(min_response_tokens, full):
            return (
                f"keeps {max(kept, 0)} of its {full} tokens next to the prompt's {p} protected token(s) "
                f"(BOS + assistant header) within --seq-length {seq_length}; at least {min(min_response_tokens, full)} "
                f"must fit (--min-response-tokens {min_response_tokens})",
                field,
            )
    return None


def out_of_vocab(pair: EncodedPair, model_vocab_size: int) -> tuple[str, int] | None:
    """``(field, id)`` of the first token id outside ``[0, model_vocab_size)``, else ``None``."""
    for field, ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        for i in ids:
            if not 0 <= i < model_vocab_size:
                return field, i
    return None


def finalize_pair(
    pair: EncodedPair,
    sample_id: int,
    location: Location | None,
    seq_length: int,
    min_response_tokens: int = 1,
    model_vocab_size: int | None = None,
) -> PreferencePair:
    """Checks an encoded pair against the model and ``seq_length`` and truncates it.

    Raises:
        BadRecord: ``token_out_of_vocab``, ``no_room_for_response``, or ``identical_responses`` (the
            two responses become the same tokens once truncated).
    """
    if model_vocab_size is not None and (bad := out_of_vocab(pair, model_vocab_size)):
        field, token = bad
        raise BadRecord(
            location, "token_out_of_vocab",
            f"holds token id {token}, outside the model's vocabulary of {model_vocab_size} ids "
            "(the tokenizer does not fit the model)", field,
        )  # fmt: skip
    lengths = (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))
    problem = room_problem(lengths, seq_length, pair.keep_prefix, pair.keep_suffix, min_response_tokens)
    if problem:
        raise BadRecord(location, "no_room_for_response", problem[0], problem[1])
    prompt, chosen, rejected = truncate_pair(
        pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, seq_length, pair.keep_prefix, pair.keep_suffix
    )
    if chosen == rejected:
        raise BadRecord(
            location, "identical_responses",
            f"is identical to 'chosen' once both are cut to --seq-length {seq_length}", "rejected",
        )  # fmt: skip
    return PreferencePair(sample_id, prompt, chosen, rejected)
