"""One validation of a run's configuration, before anything heavy is imported or any data is read.

:func:`config_problems` states every rule once, in the words of the flags as the user writes them;
:func:`sampo_megatron.plan.resolve` calls it for the trainer, ``--dry-run``, generation and the
benchmarks, and the converter calls :func:`split_rule_problems`, so a bad layout gives the same
line everywhere. What the machine can do (a GPU, Transformer Engine) comes in as ``machine``; rules
about a checkpoint's contents stay with the checkpoint (models/architecture.py,
training/run_config.py).
"""

from __future__ import annotations

import os
from typing import Literal

from .config import ModelConfig, PrecisionConfig, RunConfig
from .losses import LOSSES

Purpose = Literal["train", "dry_run", "generate"]


class ConfigError(ValueError):
    """The configuration cannot run; the message lists every problem, one per line."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def fp8_unavailable_reason(model: ModelConfig, precision: PrecisionConfig, cuda: bool, transformer_engine: bool) -> str | None:
    """Why ``--fp8-format`` cannot run here, or ``None`` when it can (or FP8 is off).

    Args:
        model: architecture (``transformer_impl``).
        precision: the precision flags.
        cuda: a CUDA GPU is present.
        transformer_engine: ``transformer_engine`` imports.
    """
    if precision.fp8_format is None:
        return None
    flag = f"--fp8-format {precision.fp8_format}"
    if not cuda:
        return f"{flag} needs a CUDA GPU with FP8 support (H100/H200 or newer); this machine has none (drop the flag on CPU)"
    if not transformer_engine:
        return f"{flag} needs Transformer Engine: pip install 'sampo-megatron[gpu]' (NGC PyTorch containers ship it)"
    if model.transformer_impl != "transformer_engine":
        return f"{flag} needs --transformer-impl transformer_engine (FP8 GEMMs are Transformer Engine layers)"
    if not precision.bf16:
        return f"{flag} needs --bf16 (the FP8 GEMMs' inputs, outputs and master weights around them)"
    return None


def attention_window_problem(model: ModelConfig, seq_length: int) -> str | None:
    """Why ``seq_length`` cannot run with the model's attention window (Mistral), or None."""
    if model.sliding_window is None or seq_length <= model.sliding_window:
        return None
    return (
        f"--seq-length {seq_length} exceeds the model's attention window ({model.sliding_window} tokens, sliding_window): "
        "attention here is fully causal, which equals the windowed attention only for sequences within the window"
    )


def _at_least(value, minimum, flag: str) -> list[str]:
    return [] if value is None or value >= minimum else [f"{flag} must be >= {minimum}, got {value}"]


def split_rule_problems(model: ModelConfig, tp: int, pp: int, vpp_layers: int | None) -> list[str]:
    """Whether megatron-core can split ``model`` over TP ``tp``, PP ``pp`` and virtual stages of
    ``vpp_layers`` layers (planning/layout.py's rules, plus the virtual-stage flag)."""
    from .planning.layout import split_problems
    from .planning.shapes import ffn_hidden_size

    if tp < 1 or pp < 1:
        return ["--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1"]
    problems = []
    vpp = 1
    if vpp_layers is not None:
        per_stage = model.num_layers // pp if model.num_layers % pp == 0 else None
        if pp == 1:
            problems.append("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        elif per_stage is not None and (vpp_layers < 1 or per_stage % vpp_layers):
            problems.append(
                f"--num-layers-per-virtual-pipeline-stage {vpp_layers} does not divide the {per_stage} layers per pipeline stage"
            )
        elif per_stage is not None:
            vpp = per_stage // vpp_layers
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    return problems + split_problems(heads, groups, model.num_layers, tp, pp, vpp, ffn=ffn_hidden_size(model))


def config_problems(
    cfg: RunConfig, world_size: int | None = None, purpose: Purpose = "train", machine: dict[str, bool] | None = None
) -> list[str]:
    """Every reason ``cfg`` cannot run, one line each (empty when it can).

    Args:
        cfg: the configuration (a checkpoint's architecture already adopted, when there is one).
        world_size: processes of the run when known: must be TP x PP x CP x DP.
        purpose: train (the trainer), dry_run (``--dry-run``: no data needed) or generate.
        machine: ``{"cuda": bool, "transformer_engine": bool}``, what this machine has (default: a
            GPU only when ``torch.cuda`` sees one, always for a dry run; Transformer Engine assumed).
    """
    m, par, tr, d, ref, ck, ev = cfg.model, cfg.parallel, cfg.training, cfg.data, cfg.reference, cfg.checkpoint, cfg.eval
    opt, sch, pr, rc = cfg.optimizer, cfg.schedule, cfg.precision, cfg.recompute
    p: list[str] = []
    # numbers that must be positive
    for value, minimum, flag in (
        (m.num_layers, 1, "--num-layers"), (m.hidden_size, 1, "--hidden-size"), (m.num_attention_heads, 1, "--num-attention-heads"),
        (m.num_query_groups, 1, "--num-query-groups"), (par.tensor_model_parallel_size, 1, "--tensor-model-parallel-size"),
        (par.pipeline_model_parallel_size, 1, "--pipeline-model-parallel-size"), (par.context_parallel_size, 1, "--context-parallel-size"),
        (tr.micro_batch_size, 1, "--micro-batch-size"), (tr.global_batch_size, 1, "--global-batch-size"),
        (tr.seq_length, 1, "--seq-length"), (tr.train_iters, 1, "--train-iters"), (tr.train_epochs, 1, "--train-epochs"),
        (opt.lr, 0.0, "--lr"), (sch.min_lr, 0.0, "--min-lr"), (opt.weight_decay, 0.0, "--weight-decay"), (opt.clip_grad, 0.0, "--clip-grad"),
        (tr.seed, 0, "--seed"), (ck.save_interval, 1, "--save-interval"), (cfg.logging.log_interval, 1, "--log-interval"),
        (ev.eval_interval, 1, "--eval-interval"), (ev.eval_max_new_tokens, 1, "--eval-max-new-tokens"),
        (ev.eval_batch_size, 1, "--eval-batch-size"), (ev.eval_temperature, 0.0, "--eval-temperature"),
        (d.min_response_tokens, 0, "--min-response-tokens"),
    ):  # fmt: skip
        p += _at_least(value, minimum, flag)
    if not 0.0 <= sch.lr_warmup_fraction <= 1.0:
        p.append(f"--lr-warmup-fraction must be in [0, 1], got {sch.lr_warmup_fraction}")
    if sch.min_lr > opt.lr:
        p.append(f"--min-lr {sch.min_lr} is above --lr {opt.lr}")
    for value, flag in ((opt.adam_beta1, "--adam-beta1"), (opt.adam_beta2, "--adam-beta2")):
        if not 0.0 <= value < 1.0:
            p.append(f"{flag} must be in [0, 1), got {value}")
    if opt.adam_eps <= 0:
        p.append(f"--adam-eps must be > 0, got {opt.adam_eps}")
    if not 0.0 < ev.eval_top_p <= 1.0:
        p.append(f"--eval-top-p must be in (0, 1], got {ev.eval_top_p}")
    if pr.bf16 and pr.fp16:
        p.append("--bf16 and --fp16 are exclusive")
    # FP8: a GPU first (the likeliest reason on CPU), then Transformer Engine, then the configuration.
    if machine is None:
        machine = {"cuda": True if purpose == "dry_run" else _cuda_available(), "transformer_engine": True}
    fp8 = fp8_unavailable_reason(m, pr, cuda=machine["cuda"], transformer_engine=machine["transformer_engine"])
    window = attention_window_problem(m, tr.seq_length)
    p += [problem for problem in (fp8, window) if problem]
    if tr.fused_logprobs and not tr.response_logits_only:
        p.append("--fused-logprobs computes log-probs at the response positions the output layer is given: drop --no-response-logits-only")
    if tr.fused_logprobs and LOSSES[cfg.loss.loss_type].needs_token_kl:
        p.append(f"--fused-logprobs does not compute --loss-type {cfg.loss.loss_type}'s per-token KL (it needs both full "
                 "distributions at every response position) yet: drop --fused-logprobs")  # fmt: skip
    p += _at_least(tr.fused_logprobs_chunk_size, 1, "--fused-logprobs-chunk-size")
    if LOSSES[cfg.loss.loss_type].needs_token_kl:
        tdpo = f"--loss-type {cfg.loss.loss_type} (TDPO) needs the reference's full-vocabulary distribution at every response position"
        if ref.ref_mode == "cache":
            p.append(f"{tdpo}; --ref-mode cache stores per-token log-probs only: use --ref-mode replica")
        if not tr.response_logits_only:
            p.append(f"{tdpo}; it recomputes it from the hidden states the replica keeps at those positions: "
                     "drop --no-response-logits-only")  # fmt: skip

    # the layout
    positive = all(x >= 1 for x in (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size,
                                    m.num_layers, m.num_attention_heads, tr.micro_batch_size, tr.seq_length))  # fmt: skip
    if positive:
        tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
        p += split_rule_problems(m, tp, pp, par.num_layers_per_virtual_pipeline_stage)
        if par.sequence_parallel and tr.seq_length % tp:
            p.append(f"--seq-length {tr.seq_length} not divisible by --tensor-model-parallel-size {tp} (--sequence-parallel)")
        if cp > 1:
            if tr.seq_length % (2 * cp):
                p.append(f"--seq-length {tr.seq_length} not divisible by 2 x --context-parallel-size {cp}")
            if m.transformer_impl != "transformer_engine":
                p.append("--context-parallel-size > 1 needs --transformer-impl transformer_engine (megatron-core's CP attention)")
        if world_size is not None:
            if world_size % (tp * pp * cp):
                p.append(f"{world_size} GPUs (processes) is not a multiple of TP {tp} x PP {pp} x CP {cp} "
                         f"(data-parallel size would be {world_size / (tp * pp * cp):g})")  # fmt: skip
            elif tr.global_batch_size % (tr.micro_batch_size * world_size // (tp * pp * cp)):
                dp = world_size // (tp * pp * cp)
                p.append(f"--global-batch-size {tr.global_batch_size} not divisible by --micro-batch-size {tr.micro_batch_size} "
                         f"x data-parallel size {dp}")  # fmt: skip
        elif tr.global_batch_size % tr.micro_batch_size:
            p.append(f"--global-batch-size {tr.global_batch_size} not divisible by --micro-batch-size {tr.micro_batch_size}")
    if rc.recompute_granularity == "full":
        vpp_layers = par.num_layers_per_virtual_pipeline_stage
        chunk_layers = vpp_layers or m.num_layers // max(1, par.pipeline_model_parallel_size)
        n = rc.recompute_num_layers
        if rc.recompute_method is None:
            p.append("--recompute-granularity full needs --recompute-method uniform or block")
        if n is None or not 1 <= n <= chunk_layers:
            p.append(f"--recompute-num-layers must be between 1 and the layers per model chunk ({chunk_layers}), got {n}")
    elif rc.recompute_granularity == "selective" and rc.recompute_num_layers is not None:
        p.append("--recompute-granularity selective takes no --recompute-num-layers")

    if tr.pack_sequences:
        p.extend(packing_problems(cfg))

    # what the purpose needs
    if purpose == "train":
        if d.data_path is None:
            p.append("--data-path is required (the preference data)")
        if d.tokenizer_model is None:
            p.append("--tokenizer-model is required (or --load a checkpoint that carries its tokenizer)")
        if tr.train_iters is None and tr.train_epochs is None:
            p.append("give --train-iters or --train-epochs")
        if ref.ref_mode == "cache" and not ref.ref_cache_dir and not ck.save:
            p.append("--ref-mode cache needs --ref-cache-dir or --save (the cache goes to <save>/ref_cache)")
        if ev.eval_interval:
            if ev.eval_prompts is None and ev.eval_data_path is None:
                p.append("--eval-interval needs --eval-prompts (lengths) and/or --eval-data-path (held-out rewards)")
            if par.context_parallel_size > 1:
                p.append("the verbosity monitor (--eval-interval) does not support --context-parallel-size > 1")
        if ev.eval_rewards_output and not (ev.eval_interval and ev.eval_data_path):
            p.append("--eval-rewards-output needs --eval-interval and --eval-data-path (the held-out pairs it writes)")
        for path, flag in ((d.data_path, "--data-path"), (d.tokenizer_model, "--tokenizer-model"), (ev.eval_prompts, "--eval-prompts"),
                           (ev.eval_data_path, "--eval-data-path")):  # fmt: skip
            if path and not os.path.exists(path) and not os.path.exists(path + ".json"):  # an indexed prefix has PREFIX.json
                p.append(f"{flag} {path}: no such file or directory")
    elif purpose == "generate":
        if ck.load is None:
            p.append("--load is required: the checkpoint to generate from")
        if par.context_parallel_size > 1:
            p.append("generation does not support --context-parallel-size > 1")
    if par.num_layers_per_virtual_pipeline_stage and (
        purpose == "generate" or (purpose == "train" and ev.eval_interval and ev.eval_prompts)
    ):
        p.append("generation runs one micro-batch per step, which megatron-core's interleaved pipeline schedule does not allow: "
                 + ("drop --num-layers-per-virtual-pipeline-stage (the checkpoint reshards)" if purpose == "generate"
                    else "the verbosity monitor's --eval-prompts need a layout without --num-layers-per-virtual-pipeline-stage"))  # fmt: skip
    return p


def validate_or_raise(cfg: RunConfig, world_size: int | None = None, purpose: Purpose = "train") -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (see :func:`config_problems`).

    Args:
        world_size: default: the launcher's (``WORLD_SIZE``, ``SLURM_NTASKS``, MPI), else 1 (a plain
            ``python`` start runs one process).
    """
    if world_size is None:
        from .runtime.launch_env import world_size_from_launcher

        world_size = world_size_from_launcher(os.environ) or 1
    problems = config_problems(cfg, world_size, purpose)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def tokenizer_problems(cfg: RunConfig, tokenizer, architecture, log) -> list[str]:
    """A ``--tokenizer-model`` given next to a checkpoint that carries its own tokenizer must be the
    same tokenizer (same ids); a different one is a problem naming both.

    Args:
        tokenizer: the loaded ``--tokenizer-model``.
        architecture: the checkpoint's CheckpointArchitecture (or None).
        log: prints a note (rank 0).
    """
    from .data import load_tokenizer

    if architecture is None or architecture.tokenizer is None:
        return []
    if os.path.abspath(architecture.tokenizer) == os.path.abspath(cfg.data.tokenizer_model):
        return []
    if not os.path.exists(architecture.tokenizer):
        log(f"note: the checkpoint names tokenizer {architecture.tokenizer}, which does not exist; using --tokenizer-model "
            f"{cfg.data.tokenizer_model}")  # fmt: skip
        return []
    own = load_tokenizer(architecture.tokenizer, cfg.data.tokenizer_type)
    if own.fingerprint() != tokenizer.fingerprint():
        return [
            f"--tokenizer-model {cfg.data.tokenizer_model} is not the tokenizer of the checkpoint ({architecture.tokenizer}): "
            f"their ids differ (fingerprints {tokenizer.fingerprint()} and {own.fingerprint()}). Leave the flag out to use "
            "the checkpoint's own tokenizer."
        ]
    return []


def packing_enabled(cfg: RunConfig) -> bool:
    """Whether the run packs its sequences: ``--pack-sequences`` / ``--no-pack-sequences`` when
    given; by default on where packing runs and was measured to help (the local spec, whose SDPA
    attention gives the same per-pair values packed, bench/packing.py), off with the Transformer
    Engine spec (its THD attention is checked by bench/gpu_check.py on a GPU, not here) and where
    :func:`packing_problems` says packing cannot run."""
    if cfg.training.pack_sequences is not None:
        return cfg.training.pack_sequences
    return cfg.model.transformer_impl == "local" and not packing_problems(cfg)


def packing_problems(cfg: RunConfig) -> list[str]:
    """Why ``--pack-sequences`` cannot run with ``cfg``."""
    m, par = cfg.model, cfg.parallel
    p = []
    if LOSSES[cfg.loss.loss_type].reads_micro_batch:
        p.append(f"--pack-sequences regroups the pairs into micro-batches, and a --loss-type {cfg.loss.loss_type} pair's loss "
                 "depends on the other pairs of its micro-batch: use --no-pack-sequences")  # fmt: skip
    if m.transformer_impl == "local" and m.local_attention != "sdpa":
        p.append("--pack-sequences needs --local-attention sdpa (megatron-core's local attention refuses packed sequences)")
    if par.context_parallel_size > 1:
        p.append("--pack-sequences does not support --context-parallel-size > 1 yet")
    if par.num_layers_per_virtual_pipeline_stage:
        p.append("--pack-sequences gives each step a varying number of micro-batches, which megatron-core's interleaved "
                 "pipeline schedule does not allow: drop --num-layers-per-virtual-pipeline-stage")  # fmt: skip
    return p
