"""The decoding loop: one forward-only pipeline pass per new token, any TP/PP layout.

Rows are right-padded. Causal attention means a row's logits at its last real position do not see
the padding after it, so rows of different lengths share one batch without an attention mask, and
a row's output does not depend on the other rows. Each step:

1. every stage runs megatron-core's forward-only schedule (see below for what it is fed);
2. the last stage takes each row's logits at its last position, gathers the vocabulary shards over
   TP, and picks the next token (:func:`~.sampling.select_next_tokens`; all TP ranks hold the same
   logits and draws, so they pick the same tokens);
3. the tokens are broadcast from the last stage to the other stages of its pipeline.

With the key/value cache (the default, megatron-core's ``StaticInferenceContext``), the first
forward runs the prompts' common length ``L = min prompt length`` and every later one a single
position for the whole batch: each layer appends that position's keys and values to its cache and
attends over the cache. Rows whose prompt is longer than the position being fed are still reading
their prompt (the token at the next position is the prompt's own); the others generate. A row's
``k``-th new token uses the draw of step ``k`` either way, so sampled outputs are the same with and
without the cache. Without it (``--no-kv-cache``, and with sequence parallelism, which cannot split a
one-position step over TP ranks) every step re-runs the batch cut to its longest row: O(n^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from ..data.batches import padded_length
from .sampling import select_next_tokens, uniform_draws


@dataclass
class GenerationConfig:
    """How to decode."""

    max_new_tokens: int = 32
    """Tokens to generate at most per prompt (fewer when EOS comes first or the sequence limit is hit)."""
    temperature: float = 0.0
    """0: greedy; > 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus mass for sampling (1: the whole vocabulary)."""
    seed: int = 1234
    """Seed of the sampling draws."""
    batch_size: int = 16
    """Prompts decoded together."""
    kv_cache: bool = True
    """Decode with megatron-core's key/value cache (one position per step) instead of re-running
    the whole sequence for every new token."""


@dataclass
class Generation:
    """One prompt's output."""

    index: int
    """Position of the prompt in the prompt set."""
    prompt_ids: list[int]
    response_ids: list[int]
    """Generated tokens, without the EOS."""
    stopped_at_eos: bool
    """False when ``max_new_tokens`` or the sequence limit ended the response."""

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], None)
    return logits, partial(_last_position_logits, batch["last"])


def _last_position_logits(last: torch.Tensor, logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
    # logits: [b, s, V/TP] -> [b, V/TP] at each row's last real token.
    return logits[torch.arange(logits.shape[0], device=logits.device), last].float()


def _forward_only(chunks, forward_step_func, tokens: torch.Tensor, start: int, **extra) -> torch.Tensor | None:
    """One forward-only pipeline pass over ``tokens`` (positions ``start..``); the collected output of
    the last stage (else None)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, width = tokens.shape
    positions = torch.arange(start, start + width, device=tokens.device).unsqueeze(0).expand(rows, -1).contiguous()
    iterators = [iter([{"tokens": tokens.contiguous(), "position_ids": positions, **extra}]) for _ in chunks]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=1,
            seq_length=width,
            micro_batch_size=rows,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def _next_logits(chunks, tokens: torch.Tensor, lengths: torch.Tensor, sequence_parallel: bool) -> torch.Tensor | None:
    """Full-vocabulary logits ``[B, V_padded]`` at each row's last token, on the last stage (else None)."""
    from megatron.core import parallel_state, tensor_parallel

    # sequence parallelism splits the sequence over TP ranks
    multiple = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    width = padded_length(int(lengths.max()), tokens.shape[1], multiple)
    logits = _forward_only(chunks, _forward_step, tokens[:, :width], 0, last=lengths - 1)
    return None if logits is None else tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def _cached_forward_step(inference_context, data_iterator, model):
    batch = next(data_iterator)
    # megatron-core's inference path gathers the vocabulary shards itself (runtime_gather_output)
    logits = model(batch["tokens"], batch["position_ids"], None, inference_context=inference_context, runtime_gather_output=True)
    return logits, _cached_last_logits


def _cached_last_logits(logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
    # With the cache megatron-core projects only the last fed position: logits [b, 1, V].
    return logits[:, -1].float()


def _cached_next_logits(chunks, tokens: torch.Tensor, start: int, inference_context) -> torch.Tensor | None:
    """Feed ``tokens[:, start:]`` (positions ``start..``) after the cached ones; full-vocabulary logits
    ``[B, V_padded]`` at the last fed position on the last stage (else None). Advances the cache."""
    if inference_context.sequence_len_offset != start:
        raise RuntimeError(f"the key/value cache holds {inference_context.sequence_len_offset} positions, expected {start}")
    logits = _forward_only(chunks, partial(_cached_forward_step, inference_context), tokens[:, start:], start)
    inference_context.sequence_len_offset = tokens.shape[1]
    return logits


def _broadcast_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            values,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return values


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def _generate_batch(chunks, prompts, indices, cfg, *, eos_id, pad_id, vocab_size, max_length, sequence_parallel):
    device = _device()
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    prompt_lengths = lengths.clone()
    width = min(max_length, int(lengths.max()) + cfg.max_new_tokens)
    tokens = torch.full((batch, width), pad_id, dtype=torch.int64, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    limits = torch.clamp(lengths + cfg.max_new_tokens, max=width)
    prompt_indices = torch.tensor(indices, dtype=torch.int64, device=device)
    done = lengths >= limits
    stopped_at_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = None
    if cfg.kv_cache and not sequence_parallel:
        from megatron.core.inference.contexts import StaticInferenceContext

        cache = StaticInferenceContext(max_batch_size=batch, max_sequence_length=width)
    fed, position = 0, int(lengths.min())  # positions in the cache; the next one to predict
    while not bool(done.all()):
        if cache is None:
            logits = _next_logits(chunks, tokens, lengths, sequence_parallel)
            generating = ~done
        else:
            logits = _cached_next_logits(chunks, tokens[:, :position], fed, cache)
            fed = position
            # rows still inside their prompt read it; the others predict `position` (= their length)
            generating = ~done & (prompt_lengths <= position)
        next_tokens = torch.empty(batch, dtype=torch.int64, device=device)
        if logits is not None:
            # a row's k-th new token takes draw k
            uniforms = uniform_draws(cfg.seed, prompt_indices, lengths - prompt_lengths) if cfg.temperature > 0 else None
            next_tokens = select_next_tokens(logits[:, :vocab_size], cfg.temperature, cfg.top_p, uniforms)
        next_tokens = _broadcast_from_last_stage(next_tokens)
        rows = generating.nonzero().squeeze(-1)
        is_eos = next_tokens == eos_id
        # EOS ends a row without being written; any other token is appended.
        write = rows[~is_eos[rows]]
        tokens[write, lengths[write]] = next_tokens[write]
        lengths[write] += 1
        stopped_at_eos |= generating & is_eos
        done = done | (generating & is_eos) | (lengths >= limits)
        position += 1
    results = []
    for row, ids in enumerate(prompts):
        response = tokens[row, len(ids) : int(lengths[row])].tolist()
        results.append(Generation(indices[row], list(ids), response, bool(stopped_at_eos[row])))
    return results


def generate(
    chunks,
    prompt_ids: list[list[int]],
    cfg: GenerationConfig,
    *,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    max_length: int,
    indices: list[int] | None = None,
    sequence_parallel: bool = False,
) -> list[Generation]:
    """Decode every prompt with this rank's model chunks; call on every rank of a model replica.

    Args:
        chunks: the model chunks (megatron-core GPTModel, DDP-wrapped or not); put in eval mode
            during the call and restored afterwards.
        prompt_ids: token ids of each prompt (e.g. :func:`~.prompts.encode_prompts`).
        cfg: decoding settings.
        eos_id: the token that ends a response.
        pad_id: id written in unused positions (never attended to by real tokens).
        vocab_size: real vocabulary size; the TP padding columns are never picked.
        max_length: longest sequence (prompt + response) the model takes.
        indices: each prompt's index in the whole prompt set (the key of its sampling draws);
            default ``0..len-1``.
        sequence_parallel: the model runs with sequence parallelism (the batch width is rounded up
            to a multiple of the TP size).

    Returns:
        One :class:`Generation` per prompt, in order, on every rank.
    """
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    indices = list(range(len(prompt_ids))) if indices is None else list(indices)
    for i, ids in zip(indices, prompt_ids):
        if len(ids) >= max_length:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens: no room to generate within the {max_length}-token limit (--seq-length)"
            )
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        results = []
        for start in range(0, len(prompt_ids), cfg.batch_size):
            stop = start + cfg.batch_size
            results += _generate_batch(
                chunks, prompt_ids[start:stop], indices[start:stop], cfg, eos_id=eos_id, pad_id=pad_id,
                vocab_size=vocab_size, max_length=max_length, sequence_parallel=sequence_parallel,
            )  # fmt: skip
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
    return results


def generate_sharded(chunks, prompt_ids: list[list[int]], cfg: GenerationConfig, **kwargs) -> list[Generation]:
    """:func:`generate` with the prompts dealt over data-parallel replicas (prompt ``i`` to replica
    ``i mod DP``), the results gathered back in prompt order on every rank. The same prompts give
    the same outputs whatever the DP size (the draws are keyed by prompt index)."""
    from megatron.core import parallel_state

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(prompt_ids), dp_size))
    local = generate(chunks, [prompt_ids[i] for i in mine], cfg, indices=mine, **kwargs) if mine else []
    if dp_size == 1:
        return local
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
    return sorted((g for part in gathered for g in part), key=lambda g: g.index)
