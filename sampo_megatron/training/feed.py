"""The trainer's data: the pairs, the global batches and this rank's micro-batches of a step, on the
device and, under context parallelism, sliced to this rank's part of each sequence."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data import DataOptions, MicroBatch, PairBatches, PairDataset, load_pairs
from ..plan import RunPlan
from ..runtime.distributed import ParallelInfo
from .reference_cache import pairs_fingerprint
from .run_config import data_fingerprint


def pad_multiple(cfg: RunConfig) -> int | None:
    """Micro-batch widths with --variable-seq-lengths: a multiple of 8, of TP under sequence
    parallelism (the sequence is split over TP) and of 2 x CP (megatron's load-balanced CP split);
    None (always --seq-length) with pipeline parallelism, whose schedule sends fixed shapes."""
    if not cfg.training.variable_seq_lengths or cfg.parallel.pipeline_model_parallel_size > 1:
        return None
    multiple = math.lcm(8, 2 * cfg.parallel.context_parallel_size)
    if cfg.parallel.sequence_parallel:
        multiple = math.lcm(multiple, cfg.parallel.tensor_model_parallel_size)
    return multiple


def slice_for_context_parallel(batch: MicroBatch) -> None:
    """Keep this CP rank's part of the sequence (megatron-core's load-balanced 2 x CP split);
    positions inside each response are numbered over the whole sequence first, so the
    down-sampling draw and the sums over CP ranks see the full responses."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    mask = batch["response_mask"]
    batch["response_index"] = torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)
    keys = [k for k in ("tokens", "labels", "position_ids", "response_mask", "response_index", "ref_logps") if k in batch]
    batch.update(get_batch_on_this_cp_rank({k: batch[k] for k in keys}))


class StepFeed:
    """Reads the preference data once and serves any step's micro-batches (a pure function of the
    step: a resumed run gets exactly the data an uninterrupted one would have).

    Args:
        plan: the run's resolved plan (its tokenizer, the model's vocabulary: a token id beyond it is
            a bad record; whether micro-batches are packed).
        par: this rank's place in the layout.
    """

    def __init__(self, plan: RunPlan, par: ParallelInfo) -> None:
        cfg, tokenizer, model_vocab = plan.config, plan.tokenizer, plan.vocab_size
        d, tr = cfg.data, cfg.training
        options = DataOptions(
            tr.seq_length, d.data_format, d.prompt_template, d.on_bad_record, d.min_response_tokens, d.data_split,
            model_vocab_size=model_vocab,
        )  # fmt: skip
        say = (lambda line: print(line, flush=True)) if dist.get_rank() == 0 else None
        pairs, bad_records, source = load_pairs(d.data_path, tokenizer, options, progress=say)
        if dist.get_rank() == 0:
            print(f"data: {source}\ndata: {bad_records.summary(len(pairs))}", flush=True)
        self._pairs = pairs
        self.par = par
        self.micro_batch_size = tr.micro_batch_size
        self.num_pairs = len(pairs)
        pack_capacity = 2 * tr.micro_batch_size * tr.seq_length if plan.pack_sequences else None
        self.batches = PairBatches(PairDataset(pairs, tr.seed), tr.global_batch_size, tr.seq_length, tokenizer.pad_id,
                                   pad_to_multiple_of=pad_multiple(cfg), pack_capacity=pack_capacity)  # fmt: skip
        self.train_iters = tr.train_iters if tr.train_iters is not None else tr.train_epochs * self.batches.steps_per_epoch
        # What a resume compares besides the flags (training/run_config.py).
        self.derived = {
            "num_pairs": len(pairs),
            "data_fingerprint": data_fingerprint(pairs),
            "tokenizer_fingerprint": tokenizer.fingerprint(),
        }

    def close(self) -> None:
        """Release the data's files (an indexed dataset is memory-mapped)."""
        close = getattr(self._pairs, "close", None)
        if close is not None:
            close()

    def cache_fingerprint(self) -> dict:
        """What a reference cache reads from the data (training/reference_cache.py): every pair's
        tokens (read once more), their count and the tokenizer."""
        pairs = self.batches.dataset.pairs
        return {"pairs": pairs_fingerprint(pairs), "num_pairs": len(pairs), "tokenizer": self.derived["tokenizer_fingerprint"]}

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def micro_batches(self, step: int, context_parallel_slice: bool = True) -> tuple[int, list[MicroBatch]]:
        """``(epoch, this rank's micro-batches)`` of global step ``step``, on the device.

        Args:
            context_parallel_slice: slice each sequence for this CP rank (off: whole sequences, as
                the reference cache stores them).
        """
        epoch, micro_batches = self.batches.micro_batches(step, self.par.dp_rank, self.par.dp_size, self.micro_batch_size)
        for batch in micro_batches:
            for key, value in batch.items():
                batch[key] = value.to(self.par.device)
            if context_parallel_slice and self.par.cp_size > 1:
                slice_for_context_parallel(batch)
        return epoch, micro_batches

    def padding_stats(self, step: int) -> dict[str, float]:
        """``padding_fraction`` and ``pack/sequences_per_row`` of global step ``step`` (data/batches.py)."""
        return self.batches.padding_stats(step, self.par.dp_size, self.micro_batch_size)

    def tokens_of_step(self, step: int) -> tuple[int, int]:
        """``(pairs, tokens)`` of global step ``step`` (both responses with their prompt)."""
        _, pairs = self.batches.batch_at(step)
        return len(pairs), sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def schedule_seq_length(micro_batches: list[MicroBatch], seq_length: int, packed: bool) -> int:
    """The sequence length megatron-core's schedule sends between pipeline stages: ``seq_length``,
    or (``packed``: the plan packs) the packed micro-batches' row width."""
    return micro_batches[0]["tokens"].shape[1] if packed else seq_length
