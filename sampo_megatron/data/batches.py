"""Deterministic order, global batches, data-parallel split and collation of preference pairs.

Everything here is a pure function of ``(seed, step)``: a resumed run asks for ``batch_at(step)``
and gets exactly the data an uninterrupted run would have seen, without replaying earlier steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Required, TypedDict, TypeVar

import numpy as np
import torch

from .errors import DataError
from .packing import collate_packed, pack_pairs, pair_tokens
from .pairs import PreferencePair

T = TypeVar("T")


class PairDataset:
    """Holds the pairs and gives a deterministic shuffled order per epoch.

    Args:
        pairs: The pairs, e.g. from :func:`~sampo_megatron.data.pairs.read_pairs_jsonl`.
        seed: Non-negative data seed.
    """

    def __init__(self, pairs: Sequence[PreferencePair], seed: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        # A lazy sequence (an indexed dataset) stays lazy; anything else is copied into a list.
        self.pairs = pairs if isinstance(pairs, Sequence) else list(pairs)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]

    def epoch_order(self, epoch: int) -> list[int]:
        """Permutation of ``range(len(self))`` for ``epoch``.

        A pure function of ``(seed, epoch)``: a numpy ``Generator`` seeded with the entropy
        ``[seed, epoch]`` (a SeedSequence), so epochs get independent orders and no global RNG
        state is touched or needed on resume.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rng = np.random.default_rng([self.seed, int(epoch)])
        return rng.permutation(len(self.pairs)).tolist()


class MicroBatch(TypedDict, total=False):
    """One micro-batch of whole preference pairs, the unit megatron-core's schedules iterate over.

    Rows ``0..P-1`` are the chosen responses and rows ``P..2P-1`` the rejected ones of the same
    ``P`` pairs (row ``i`` and row ``P + i`` are one pair), so a pair's loss is computed on one rank.
    ``S`` is the micro-batch's width (see :func:`collate_pairs`); under context parallelism each CP
    rank holds its slice of every ``[2P, S]`` field.
    """

    tokens: Required[torch.Tensor]
    """[2P, S] int64: prompt + response, right-padded."""
    labels: Required[torch.Tensor]
    """[2P, S] int64: ``tokens`` shifted left by one; the pad id where there is no target."""
    response_mask: Required[torch.Tensor]
    """[2P, S] bool: True where ``labels`` is a response token (EOS included)."""
    position_ids: Required[torch.Tensor]
    """[2P, S] int64: positions (RoPE)."""
    sample_ids: Required[torch.Tensor]
    """[P] int64: the pairs' ids (the SamPO draws and the reference cache are keyed by them)."""
    ref_logps: torch.Tensor
    """[2P, S] float: reference log-probs, attached by the reference (training/reference.py)."""
    ref_hidden: torch.Tensor
    """[n, 1, h] TDPO: the reference's final hidden states at the ``n`` response positions (in
    ``response_mask.t().nonzero()`` order), attached by the reference replica."""
    response_index: torch.Tensor
    """[2P, S] int64: position inside the response over the whole sequence (-1 elsewhere); set before
    a context-parallel split, so the down-sampling draw sees whole responses."""
    # A packed micro-batch (data/packing.py): the model's fields above are one row ``[1, C]`` of
    # sequences laid end to end; the loss's (``response_mask``, ``ref_logps``) stay ``[2P, S]``.
    cu_seqlens: torch.Tensor
    """[n + 1] int32: where each packed sequence starts (THD)."""
    packed_response_mask: torch.Tensor
    """[1, C] bool: ``response_mask`` in the packed row."""
    packed_index: torch.Tensor
    """[2P, S] int64: where each position of the loss's rows sits in the packed row (-1: none)."""
    loss_scale: torch.Tensor
    """0-d float: the packed micro-batch's loss is ``sum of pair losses x loss_scale`` (the pairs per
    micro-batch vary, so a mean per micro-batch would weight pairs unequally)."""


def padded_length(longest: int, seq_length: int, pad_to_multiple_of: int | None) -> int:
    """Columns of a micro-batch whose longest sequence has ``longest`` tokens.

    ``seq_length`` when ``pad_to_multiple_of`` is None (fixed shapes); otherwise
    ``min(seq_length, ceil(longest / m) * m)`` with ``m = pad_to_multiple_of``.
    """
    if pad_to_multiple_of is None:
        return seq_length
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    return min(seq_length, -(-longest // pad_to_multiple_of) * pad_to_multiple_of)


def collate_pairs(
    pairs: Sequence[PreferencePair], seq_length: int, pad_id: int, pad_to_multiple_of: int | None = None
) -> MicroBatch:
    """Stacks ``P`` pairs into a :class:`MicroBatch`: chosen rows ``0..P-1``, rejected rows ``P..2P-1``.

    Shapes are ``[2P, S]`` (right padding). Without ``pad_to_multiple_of``, ``S = seq_length`` for
    every micro-batch (megatron's pipeline schedule communicates tensors of one fixed shape); with
    it, ``S`` is the micro-batch's longest sequence rounded up to that multiple (see
    :func:`padded_length`), so no work is spent on columns that are padding in every row. Row ``i``
    and row ``P + i`` are the same pair.

    Args:
        pairs: The pairs of one micro-batch (each sequence already fits ``seq_length``).
        seq_length: Maximum (and, without ``pad_to_multiple_of``, padded) sequence length.
        pad_id: Id used for padding, and as the label wherever there is no target.
        pad_to_multiple_of: Pad only to the longest sequence, rounded up to this multiple (which
            must divide ``seq_length`` when the trainer needs divisible shapes).

    Returns:
        ``tokens`` [2P, S] int64: prompt + response, right-padded.
        ``labels`` [2P, S] int64: ``labels[:, t] = tokens[:, t + 1]``; ``pad_id`` at the last token of
        each sequence and on padding.
        ``response_mask`` [2P, S] bool: True where the target ``labels[:, t]`` is a response token
        (the EOS included), i.e. ``t`` in ``[len(prompt) - 1, len(prompt) + len(response) - 1)``.
        ``position_ids`` [2P, S] int64: ``arange(S)`` per row.
        ``sample_ids`` [P] int64.

    Raises:
        ValueError: no pairs, or a sequence longer than ``seq_length``.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    n = len(pairs)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    width = padded_length(longest, seq_length, pad_to_multiple_of)
    tokens = torch.full((2 * n, width), pad_id, dtype=torch.int64)
    labels = torch.full((2 * n, width), pad_id, dtype=torch.int64)
    response_mask = torch.zeros((2 * n, width), dtype=torch.bool)
    for i, pair in enumerate(pairs):
        for row, response in ((i, pair.chosen_ids), (n + i, pair.rejected_ids)):
            seq = pair.prompt_ids + response
            length = len(seq)
            if length > seq_length:
                raise ValueError(f"sample {pair.sample_id}: sequence of {length} tokens exceeds seq_length={seq_length}")
            tokens[row, :length] = torch.tensor(seq, dtype=torch.int64)
            labels[row, : length - 1] = tokens[row, 1:length]
            # Position t predicts token t+1; response tokens sit at [len(prompt), length).
            response_mask[row, len(pair.prompt_ids) - 1 : length - 1] = True
    position_ids = torch.arange(width, dtype=torch.int64).unsqueeze(0).expand(2 * n, -1).contiguous()
    sample_ids = torch.tensor([p.sample_id for p in pairs], dtype=torch.int64)
    return MicroBatch(tokens=tokens, labels=labels, response_mask=response_mask, position_ids=position_ids, sample_ids=sample_ids)


def split_for_rank(pairs: Sequence[T], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[T]]:
    """This data-parallel rank's micro-batches of a global batch.

    The global batch is cut into contiguous micro-batches of ``micro_batch_size`` pairs, and those
    are dealt round-robin to DP ranks: rank ``r`` gets global micro-batches ``r, r + dp_size,
    r + 2 * dp_size, ...``. That is the layout of megatron's ``MegatronPretrainingSampler`` (each
    step of ``micro_batch_size * dp_size`` samples is split by rank). The union over ranks and
    micro-batches is exactly the global batch, and each micro-batch holds whole pairs.

    Args:
        pairs: One global batch.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel world size.
        micro_batch_size: Pairs per micro-batch.

    Returns:
        ``len(pairs) // (micro_batch_size * dp_size)`` micro-batches of ``micro_batch_size`` pairs.

    Raises:
        ValueError: the global batch is not divisible by ``micro_batch_size * dp_size``, or the
            rank/sizes are out of range.
    """
    if dp_size < 1 or micro_batch_size < 1:
        raise ValueError(f"dp_size and micro_batch_size must be >= 1, got {dp_size}, {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    per_step = micro_batch_size * dp_size
    if len(pairs) % per_step:
        raise ValueError(
            f"global batch of {len(pairs)} pairs is not divisible by micro_batch_size * dp_size = {micro_batch_size} * {dp_size}"
        )
    return [
        list(pairs[start + dp_rank * micro_batch_size : start + (dp_rank + 1) * micro_batch_size])
        for start in range(0, len(pairs), per_step)
    ]


class PairBatches:
    """Global batches in epoch order, addressable by step for exact resumption.

    Step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``; each epoch uses
    :meth:`PairDataset.epoch_order`. An epoch's trailing partial batch (``len(dataset) %
    global_batch_size`` pairs) is DROPPED, so every step has the same number of pairs; those pairs
    usually land in a full batch in another epoch because each epoch is reshuffled.

    Args:
        dataset: The pairs and their seed.
        global_batch_size: Pairs per optimizer step, over all DP ranks and micro-batches.
        seq_length: Maximum (or fixed padded) sequence length for :meth:`micro_batches`.
        pad_id: Padding id for :meth:`micro_batches`.
        pad_to_multiple_of: Pad each micro-batch only to its longest sequence, rounded up to this
            multiple (see :func:`collate_pairs`); None pads every micro-batch to ``seq_length``.
        pack_capacity: Pack each rank's pairs of a step into micro-batches of this many tokens
            (data/packing.py) instead of ``micro_batch_size`` pairs each; None: no packing.
    """

    def __init__(
        self, dataset: PairDataset, global_batch_size: int, seq_length: int, pad_id: int, pad_to_multiple_of: int | None = None,
        pack_capacity: int | None = None,
    ) -> None:  # fmt: skip
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if len(dataset) < global_batch_size:
            raise DataError(f"the data has {len(dataset)} usable pairs, fewer than --global-batch-size {global_batch_size} "
                            "(one step's pairs): give more data or a smaller --global-batch-size")  # fmt: skip
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_capacity = pack_capacity
        # One-entry cache: steps are usually asked in order, and a permutation costs O(N).
        self._cached: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch."""
        return len(self.dataset) // self.global_batch_size

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.dataset.epoch_order(epoch))
        return self._cached[1]

    def batch_at(self, step: int) -> tuple[int, list[PreferencePair]]:
        """``(epoch, pairs)`` of global step ``step`` (0-based); a pure function of the step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        order = self._order(epoch)[start : start + self.global_batch_size]
        return epoch, [self.dataset[i] for i in order]

    def micro_batch_pairs(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> tuple[int, list[list[PreferencePair]]]:
        """``(epoch, the pairs of each micro-batch)`` of this DP rank for ``step``: see
        :func:`split_for_rank`; packed, this rank's pairs of the step in first-fit-decreasing packs."""
        epoch, pairs = self.batch_at(step)
        parts = split_for_rank(pairs, dp_rank, dp_size, micro_batch_size)
        if self.pack_capacity is not None:
            parts = pack_pairs([pair for part in parts for pair in part], self.pack_capacity)
        return epoch, parts

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> tuple[int, list[MicroBatch]]:
        """``(epoch, collated micro-batches)`` of this DP rank for ``step``; see :meth:`micro_batch_pairs`."""
        epoch, parts = self.micro_batch_pairs(step, dp_rank, dp_size, micro_batch_size)
        if self.pack_capacity is None:
            return epoch, [collate_pairs(p, self.seq_length, self.pad_id, self.pad_to_multiple_of) for p in parts]
        batches = [collate_packed(p, self._packed_width(p), self.pad_id) for p in parts]
        # mean over micro-batches (the schedule) and over DP ranks (the gradient all-reduce) of
        # sum(losses) x scale = the mean over the global batch's pairs
        scale = torch.tensor(dp_size * len(batches) / self.global_batch_size)
        for batch in batches:
            batch["loss_scale"] = scale
        return epoch, batches

    def _packed_width(self, pairs: list[PreferencePair]) -> int:
        return padded_length(sum(pair_tokens(p) for p in pairs), self.pack_capacity, self.pad_to_multiple_of)

    def padding_stats(self, step: int, dp_size: int, micro_batch_size: int) -> dict[str, float]:
        """Over the whole step (every DP rank): ``padding_fraction``, the share of the positions the
        model computes that are padding, and ``pack/sequences_per_row`` (1 without packing)."""
        positions = real = sequences = rows = 0
        for rank in range(dp_size):
            _, parts = self.micro_batch_pairs(step, rank, dp_size, micro_batch_size)
            for part in parts:
                real += sum(pair_tokens(p) for p in part)
                sequences += 2 * len(part)
                if self.pack_capacity is not None:
                    positions += self._packed_width(part)
                    rows += 1
                else:
                    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in part)
                    positions += 2 * len(part) * padded_length(longest, self.seq_length, self.pad_to_multiple_of)
                    rows += 2 * len(part)
        return {"padding_fraction": 1.0 - real / positions, "pack/sequences_per_row": sequences / rows}
