"""The verbosity monitor: every ``--eval-interval`` steps, response lengths of the policy's own
generations on ``--eval-prompts`` and the implicit rewards on a held-out preference set.

DPO's failure mode is a policy whose responses grow longer over training (Lu et al. 2024, Fig. 4);
the training metrics show only the lengths of the *data*. The monitor generates with the policy
(:mod:`sampo_megatron.generation`, greedy by default) and logs ``eval/length_mean``,
``eval/length_median``, ``eval/eos_fraction`` and, on ``--eval-data-path``, ``eval/rewards/*``
(debiased as the run's ``--length-debias``) and ``eval/rewards_full/*`` (whole responses); for
TDPO these are DPO's implicit rewards, without the sequential KL term. The held-out rewards are
also split by length (:mod:`sampo_megatron.evaluation.stratified`): accuracy and mean margin where
the chosen response is the longer / the shorter one (``eval/<rewards>/accuracies_chosen_longer``,
``..._chosen_shorter``, ``margins_...``) and the correlation of the margin with the length
difference (``eval/<rewards>/margin_length_corr``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import torch

from ..config import RunConfig
from ..data import DataOptions, MicroBatch, collate_pairs, load_pairs
from ..evaluation import length_stratified
from ..generation import GenerationConfig, encode_prompts, generate_sharded, read_prompts
from ..losses import LOSSES, PreferenceInputs, preference_loss
from ..runtime.distributed import ParallelInfo
from .reference import forward_only_logps
from .step import StepContext

# Held-out rewards are reported as these metrics' means over the pairs.
_REWARD_METRICS = ("rewards", "rewards_full")


def length_summary(lengths: list[int], stopped_at_eos: list[bool]) -> dict[str, float]:
    """Mean and median response length (tokens, EOS excluded) and the share of responses that ended
    with EOS (the rest hit ``--eval-max-new-tokens``)."""
    return {
        "eval/length_mean": float(statistics.fmean(lengths)),
        "eval/length_median": float(statistics.median(lengths)),
        "eval/eos_fraction": sum(stopped_at_eos) / len(stopped_at_eos),
    }


class VerbosityMonitor:
    """Evaluates the policy; built by the trainer when ``--eval-interval`` is set. Reads the models,
    changes nothing.

    Args:
        cfg: the run's configuration (``eval``, ``data``, ``training`` and ``parallel`` are read).
        tokenizer: the run's tokenizer.
        vocab_size: the model's vocabulary (TP padding columns excluded).
        policy: the policy's (DDP-wrapped) model chunks.
        reference: the reference replica's chunks, or None (a cache or a reference-free loss).
        ctx: the training step's context (loss configuration, TP group).
        par: this rank's place in the layout.
        message: prints on the logging rank.
    """

    def __init__(self, cfg: RunConfig, tokenizer, vocab_size: int, policy: list, reference: list | None, ctx: StepContext,
                 par: ParallelInfo, message) -> None:  # fmt: skip
        ev = cfg.eval
        if ev.eval_prompts is None and ev.eval_data_path is None:
            raise ValueError("--eval-interval needs --eval-prompts (lengths) and/or --eval-data-path (held-out rewards)")
        if par.cp_size > 1:
            raise ValueError("the verbosity monitor (--eval-interval) does not support --context-parallel-size > 1")
        self.cfg, self.tokenizer, self.vocab_size = cfg, tokenizer, vocab_size
        # the held-out micro-batches are padded (collate_pairs), whether or not the run packs its own
        self.policy, self.reference, self.ctx, self.par = policy, reference, dataclasses.replace(ctx, packed=False), par
        self.interval = ev.eval_interval
        self.output = ev.eval_output
        self.rewards_output = ev.eval_rewards_output
        self.generation = GenerationConfig(
            ev.eval_max_new_tokens, ev.eval_temperature, ev.eval_top_p, cfg.training.seed, ev.eval_batch_size
        )
        self.prompts = read_prompts(ev.eval_prompts) if ev.eval_prompts else []
        self.prompt_ids = encode_prompts(self.prompts, tokenizer, cfg.data.prompt_template)
        self.micro_batches = self._held_out_batches(message) if ev.eval_data_path else []
        if self.micro_batches and reference is None and not LOSSES[cfg.loss.loss_type].reference_free:
            raise ValueError("held-out rewards (--eval-data-path) need the reference replica: use --ref-mode replica")
        # TDPO's rewards add the sequential KL, which needs the reference's whole distribution: held
        # out, its rewards are DPO's beta * log(pi / pi_ref) (the same debiasing).
        self._reward_loss = ctx.loss
        if LOSSES[cfg.loss.loss_type].needs_token_kl:
            self._reward_loss = dataclasses.replace(ctx.loss, loss_type="sigmoid")

    def _held_out_batches(self, message) -> list[MicroBatch]:
        cfg = self.cfg
        d = cfg.data
        options = DataOptions(
            cfg.training.seq_length, d.data_format, d.prompt_template, d.on_bad_record, d.min_response_tokens,
            d.data_split, model_vocab_size=self.vocab_size,
        )  # fmt: skip
        pairs, bad, source = load_pairs(cfg.eval.eval_data_path, self.tokenizer, options)
        message(f"eval data: {source}; {bad.summary(len(pairs))}")
        size = cfg.training.micro_batch_size
        batches = []
        for start in range(0, len(pairs), size):
            # Fixed width (--seq-length): the pipeline schedule sends one shape.
            batch = collate_pairs(pairs[start : start + size], cfg.training.seq_length, self.tokenizer.pad_id)
            batches.append(MicroBatch(**{k: v.to(self.par.device) for k, v in batch.items()}))
        return batches

    def due(self, iteration: int) -> bool:
        return self.interval is not None and self.interval > 0 and iteration % self.interval == 0

    def evaluate(self, iteration: int) -> dict[str, float]:
        """The eval metrics of the policy as of ``iteration`` (on every rank; logged by the trainer)."""
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.prompt_ids:
            metrics.update(self._lengths(iteration))
        if self.micro_batches:
            metrics.update(self._held_out_rewards(iteration))
        metrics["eval/time_s"] = time.perf_counter() - start
        return metrics

    def _lengths(self, iteration: int) -> dict[str, float]:
        cfg, tok = self.cfg, self.tokenizer
        results = generate_sharded(
            self.policy, self.prompt_ids, self.generation, eos_id=tok.eos_id, pad_id=tok.pad_id,
            vocab_size=self.vocab_size, max_length=cfg.training.seq_length, sequence_parallel=cfg.parallel.sequence_parallel,
        )  # fmt: skip
        if self.output and self.par.logs:
            _append_jsonl(self.output, (
                {"iteration": iteration, "index": g.index, "prompt": prompt, "response": tok.decode(g.response_ids),
                 "num_tokens": g.num_tokens, "stopped_at_eos": g.stopped_at_eos}
                for prompt, g in zip(self.prompts, results)
            ))  # fmt: skip
        return length_summary([g.num_tokens for g in results], [g.stopped_at_eos for g in results])

    @torch.no_grad()
    def _held_out_rewards(self, iteration: int) -> dict[str, float]:
        seq = self.cfg.training.seq_length
        modes = [m.training for m in self.policy]
        for m in self.policy:
            m.eval()
        try:
            policy = forward_only_logps(self.policy, self.micro_batches, self.ctx, seq)
            reference = (
                forward_only_logps(self.reference, self.micro_batches, self.ctx, seq) if self.reference is not None else None
            )
        finally:
            for m, mode in zip(self.policy, modes):
                m.train(mode)
        if policy is None:  # not the last pipeline stage
            return {}
        sums: dict[str, float] = {}
        per_pair: dict[str, list[torch.Tensor]] = {}
        pairs = 0
        for i, batch in enumerate(self.micro_batches):
            out = preference_loss(
                PreferenceInputs(
                    policy[i], batch["response_mask"], batch["sample_ids"], None if reference is None else reference[i]
                ),
                self._reward_loss,
                epoch=0,
            )
            for name, values in out.metrics.items():
                if name.split("/")[0] in _REWARD_METRICS or name.startswith("logps_full/"):
                    sums[f"eval/{name}"] = sums.get(f"eval/{name}", 0.0) + float(values.double().sum())
                per_pair.setdefault(name, []).append(values.detach().double().cpu())
            pairs += out.losses.numel()
        metrics = {name: total / pairs for name, total in sums.items()}
        # the long/short view (evaluation/stratified.py), on the debiased and the whole-response rewards
        pair_values = {name: torch.cat(values).numpy() for name, values in per_pair.items()}
        if self.rewards_output and self.par.logs:
            self._write_pair_rewards(iteration, pair_values)
        for prefix in _REWARD_METRICS:
            split = length_stratified(
                pair_values[f"{prefix}/margins"], pair_values["lengths/chosen"], pair_values["lengths/rejected"]
            )
            metrics.update({f"eval/{prefix}/{name}": value for name, value in split.items() if not name.startswith("pairs_")})
        metrics.update({f"eval/{name}": value for name, value in split.items() if name.startswith("pairs_")})
        return metrics

    def _write_pair_rewards(self, iteration: int, pair_values: dict) -> None:
        """One line per held-out pair, in the file's order: ``rewards/*`` debiased, ``rewards_full/*`` whole."""
        names = ["lengths/chosen", "lengths/rejected"] + [f"{p}/{side}" for p in _REWARD_METRICS for side in ("chosen", "rejected", "margins")]
        _append_jsonl(self.rewards_output, (
            {"iteration": iteration, "index": index, **{name: float(pair_values[name][index]) for name in names}}
            for index in range(len(pair_values["lengths/chosen"]))
        ))  # fmt: skip


def _append_jsonl(path: str, records) -> None:
    """Append one JSON line per record (the logging rank's --eval-output / --eval-rewards-output)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
