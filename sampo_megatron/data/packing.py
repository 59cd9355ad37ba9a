"""Packed micro-batches of whole preference pairs (``--pack-sequences``).

Without packing a micro-batch is ``[2P, S]``: every sequence is right-padded to the micro-batch's
longest (or to ``--seq-length`` under pipeline parallelism). With packing, the sequences of several
whole pairs are laid end to end in one row of ``capacity`` tokens, megatron-core's THD layout:

- the model sees ``tokens [1, capacity]`` and ``cu_seqlens`` (where each sequence starts; the
  trailing padding is one more sequence of its own), so RoPE restarts and attention stays inside
  each sequence (``PackedSeqParams``; models/attention.py on the local spec);
- the loss sees the same ``[2P, L]`` rows as without packing (chosen rows, then rejected rows of
  the same pairs; ``L`` the longest sequence): ``packed_index`` maps each of those positions to
  its place in the packed row, so log-probs are gathered back before the loss, and SamPO's masks,
  a pure function of (seed, epoch, sample id, role, position inside the response), are the same.

A pair's two sequences are always in the same pack, so its loss is computed on one rank.
A pack holds at most ``2 x --micro-batch-size x --seq-length`` tokens (its capacity): the tokens of
an unpacked micro-batch, so any pair that fits unpacked fits a pack, and a pack needs no more
activation memory than an unpacked micro-batch. Its row is as wide as its pairs' tokens, rounded up
like an unpacked micro-batch (``--variable-seq-lengths``), or the whole capacity under pipeline
parallelism (whose schedule sends one fixed shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .pairs import PreferencePair

if TYPE_CHECKING:  # batches.py imports this module
    from .batches import MicroBatch


def pair_tokens(pair: PreferencePair) -> int:
    """Tokens of a pair's two sequences (the prompt twice)."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def pack_pairs(pairs: Sequence[PreferencePair], capacity: int) -> list[list[PreferencePair]]:
    """First-fit decreasing: the pairs, longest first, each into the first pack with room.

    A pure function of ``pairs`` (ties keep their order), so a step's packs are a pure function of
    the step. Inside a pack the pairs keep their order in ``pairs``; packs are ordered by their
    first pair.

    Raises:
        ValueError: a pair does not fit ``capacity``.
    """
    order = sorted(range(len(pairs)), key=lambda i: (-pair_tokens(pairs[i]), i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        size = pair_tokens(pairs[i])
        if size > capacity:
            raise ValueError(f"sample {pairs[i].sample_id}: its two sequences ({size} tokens) exceed a pack of {capacity}")
        target = next((b for b, free in enumerate(room) if size <= free), None)
        if target is None:
            packs.append([])
            room.append(capacity)
            target = len(packs) - 1
        packs[target].append(i)
        room[target] -= size
    packs = sorted((sorted(p) for p in packs), key=lambda p: p[0])
    return [[pairs[i] for i in p] for p in packs]


def collate_packed(pairs: Sequence[PreferencePair], width: int, pad_id: int) -> MicroBatch:
    """One packed micro-batch of ``P`` whole pairs (see the module docstring).

    Args:
        pairs: the pack's pairs (from :func:`pack_pairs`).
        width: tokens of the packed row: the pack capacity (fixed shapes, pipeline parallelism),
            or the pairs' tokens rounded up to a multiple (PairBatches).
        pad_id: id of the padding, and the label where there is no target.

    Returns:
        ``tokens``, ``labels``, ``position_ids`` [1, width] int64 and ``packed_response_mask``
        [1, width] bool: the packed row (positions restart at each sequence; no label crosses
        a sequence end).
        ``cu_seqlens`` [n + 1] int32: sequence starts, chosen then rejected of each pair in turn,
        then the trailing padding when there is some.
        ``response_mask`` [2P, L] bool, ``packed_index`` [2P, L] int64 (-1 past a sequence's end):
        the unpacked rows of the loss, and where each of their positions sits in the packed row.
        ``sample_ids`` [P] int64.
    """
    if not pairs:
        raise ValueError("collate_packed needs at least one pair")
    n = len(pairs)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    tokens = torch.full((1, width), pad_id, dtype=torch.int64)
    labels = torch.full((1, width), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((1, width), dtype=torch.int64)
    packed_response_mask = torch.zeros((1, width), dtype=torch.bool)
    response_mask = torch.zeros((2 * n, longest), dtype=torch.bool)
    packed_index = torch.full((2 * n, longest), -1, dtype=torch.int64)
    starts, at = [0], 0
    for i, pair in enumerate(pairs):
        for row, response in ((i, pair.chosen_ids), (n + i, pair.rejected_ids)):
            seq = torch.tensor(pair.prompt_ids + response, dtype=torch.int64)
            length, first = len(seq), len(pair.prompt_ids) - 1  # position `first` predicts the 1st response token
            if at + length > width:
                raise ValueError(f"pairs of {sum(map(pair_tokens, pairs))} tokens exceed a packed row of {width}")
            tokens[0, at : at + length] = seq
            labels[0, at : at + length - 1] = seq[1:]
            position_ids[0, at : at + length] = torch.arange(length)
            packed_response_mask[0, at + first : at + length - 1] = True
            response_mask[row, first : length - 1] = True
            packed_index[row, :length] = torch.arange(at, at + length)
            at += length
            starts.append(at)
    if at < width:
        starts.append(width)
    return dict(  # a MicroBatch
        tokens=tokens, labels=labels, position_ids=position_ids, packed_response_mask=packed_response_mask,
        cu_seqlens=torch.tensor(starts, dtype=torch.int32), response_mask=response_mask, packed_index=packed_index,
        sample_ids=torch.tensor([p.sample_id for p in pairs], dtype=torch.int64),
    )  # fmt: skip


def packed_seq_params(batch: MicroBatch):
    """megatron-core's ``PackedSeqParams`` (THD) of a packed micro-batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"]
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


def to_loss_rows(values: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Per-position ``values`` of the model's layout -> the loss's ``[2P, L]`` rows (zeros past each
    sequence's end); unchanged for an unpacked micro-batch, whose layouts are the same."""
    index = batch.get("packed_index")
    if index is None:
        return values
    flat = values.reshape(-1)
    gathered = flat[index.clamp_min(0)]
    return torch.where(index >= 0, gathered, torch.zeros((), dtype=values.dtype, device=values.device))
