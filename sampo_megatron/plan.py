"""The resolved run plan: the configuration settled once per process, validated, and frozen.

    plan = resolve(parse_config(argv), world_size, purpose="train")

:func:`resolve` adopts the architecture of the checkpoints the run starts from (``sampo_model.json``),
picks the tokenizer (given, or the checkpoint's), decides packing, derives the layout (TP, PP, VPP,
DP, CP) and the vocabulary with its TP padding, and checks every rule once
(sampo_megatron/validation.py): all problems together, one line each, in the flags' words. The
trainer, generation, ``--dry-run``, ``sampo-precompute-reference`` and ``bench/gpu_check.py`` read
what they need from the :class:`RunPlan`; none of them re-derives a decision or writes one back
(assigning a field of ``plan.config`` raises ``dataclasses.FrozenInstanceError``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal, Mapping

from .config import RunConfig
from .frozen import frozen_copy
from .planning.dry_run import layout_from_config
from .planning.shapes import Layout, padded_vocab_size
from .validation import ConfigError, config_problems, packing_enabled

Purpose = Literal["train", "generate", "dry_run", "model"]
"""train: the trainer (data, tokenizer, world size); generate: ``sampo-generate`` (``--load``);
dry_run: ``--dry-run`` (planned for a GPU machine, nothing read beyond ``sampo_model.json``);
model: a model of the configured shape and nothing else (``bench/gpu_check.py``)."""

# Which checkpoints lend their architecture, in priority order.
_ARCHITECTURE_SOURCES = {
    "train": ("--save", "--load", "--ref-load"),
    "generate": ("--load",),
    "dry_run": ("--load", "--ref-load"),
    "model": (),
}


@dataclass(frozen=True)
class RunPlan:
    """What a run is, decided once (see the module docstring). Every field is final."""

    config: RunConfig
    """The configuration with the decisions filled in (architecture adopted, ``tokenizer_model``,
    ``pack_sequences`` as decided); frozen."""
    purpose: Purpose
    world_size: int
    """Processes of the run: TP x PP x CP x DP."""
    layout: Layout
    """Sizes of the parallel layout and the batch (planning/shapes.py)."""
    architecture: object | None = None
    """The ``CheckpointArchitecture`` adopted from a checkpoint (its Hugging Face config travels on
    into the checkpoints the run saves), or None."""
    tokenizer: object | None = None
    """The loaded tokenizer (train, generate), else None."""
    vocab_size: int | None = None
    """Columns of the softmax: the model's vocabulary (the TP padding excluded)."""
    padded_vocab_size: int | None = None
    """Rows of the embedding and output layer (the vocabulary padded for TP)."""

    @property
    def pack_sequences(self) -> bool:
        """Whether the run's micro-batches are packed (data/packing.py)."""
        return bool(self.config.training.pack_sequences)

    @property
    def virtual_pipeline_size(self) -> int | None:
        """Virtual stages per pipeline rank (interleaved schedule), or None without interleaving."""
        return self.layout.vpp if self.config.parallel.num_layers_per_virtual_pipeline_stage else None


def resolve(
    cfg: RunConfig,
    world_size: int | None = None,
    purpose: Purpose = "train",
    environ: Mapping[str, str] | None = None,
    log=None,
) -> RunPlan:
    """Settle ``cfg`` into a frozen :class:`RunPlan`, or raise :class:`ConfigError` listing every problem.

    ``cfg`` itself is not changed.

    Args:
        cfg: the parsed flags.
        world_size: processes of the run; default ``--world-size`` (dry run), else the launcher's
            (``WORLD_SIZE``, ``SLURM_NTASKS``, MPI), else 1 (a plain ``python`` start).
        purpose: what the plan is for (:data:`Purpose`).
        environ: the environment the launcher variables are read from (default ``os.environ``).
        log: prints a note (default: ``print`` on global rank 0).
    """
    from .runtime.launch_env import world_size_from_launcher

    environ = os.environ if environ is None else environ
    if log is None:
        log = (lambda line: print(line, flush=True)) if environ.get("RANK", "0") == "0" else (lambda line: None)
    guessed = False
    if world_size is None:
        world_size = (cfg.plan.world_size if purpose == "dry_run" else None) or world_size_from_launcher(environ)
        guessed = world_size is None
        world_size = world_size or 1

    problems: list[str] = []
    model, tokenizer_model, architecture = cfg.model, cfg.data.tokenizer_model, None
    try:
        architecture, model = _adopt_architecture(cfg, _ARCHITECTURE_SOURCES[purpose])
    except (ValueError, OSError) as err:  # a flag that disagrees with the checkpoint, two architectures, a bad marker
        problems.append(str(err))
    if architecture is not None and tokenizer_model is None:
        tokenizer_model = architecture.tokenizer
    resolved = dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, tokenizer_model=tokenizer_model))
    # The packing default depends on the model (adopted above).
    resolved = dataclasses.replace(
        resolved, training=dataclasses.replace(resolved.training, pack_sequences=packing_enabled(resolved))
    )
    problems += config_problems(resolved, world_size, purpose if purpose != "model" else "dry_run", machine=_machine(resolved, purpose))
    if purpose == "generate":
        problems += _generation_problems(resolved)

    tokenizer, vocab, padded = None, resolved.model.vocab_size, None
    if not problems:
        tokenizer, vocab, more = _vocabulary(resolved, architecture, purpose, log)
        problems += more
    if problems:
        note = "\n  (no launcher sets the world size here, so 1 GPU was assumed: pass --world-size N)" if guessed and purpose == "dry_run" else ""
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems) + note)
    if vocab is not None:
        padded = padded_vocab_size(vocab, resolved.model.make_vocab_size_divisible_by, resolved.parallel.tensor_model_parallel_size)
    return RunPlan(
        config=frozen_copy(resolved), purpose=purpose, world_size=world_size, layout=layout_from_config(resolved, world_size),
        architecture=architecture, tokenizer=tokenizer, vocab_size=vocab, padded_vocab_size=padded,
    )  # fmt: skip


def _adopt_architecture(cfg: RunConfig, flags: tuple[str, ...]):
    """``(architecture, model)``: the architecture of the first checkpoint among ``flags`` that
    carries one (``sampo_model.json``), and a copy of ``cfg.model`` with its fields.

    Raises:
        ValueError: two sources disagree, or a flag the user set disagrees with the checkpoint.
    """
    from .models.architecture import adopt_architecture
    from .runtime.checkpointing import resolve_checkpoint

    paths = {"--save": cfg.checkpoint.save, "--load": cfg.checkpoint.load, "--ref-load": cfg.reference.ref_load}
    sources = {flag: resolve_checkpoint(paths[flag]) for flag in flags if paths[flag] and os.path.isdir(paths[flag])}
    model = dataclasses.replace(cfg.model)
    return adopt_architecture(model, cfg.explicit_flags, sources), model


def _machine(cfg: RunConfig, purpose: Purpose) -> dict[str, bool]:
    """What this machine can run: a CUDA GPU, Transformer Engine (asked only when FP8 is). A dry run
    plans for a GPU machine it does not run on."""
    if purpose == "dry_run":
        return {"cuda": True, "transformer_engine": True}
    import torch

    te = True
    if cfg.precision.fp8_format is not None:
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            te = False
    return {"cuda": torch.cuda.is_available(), "transformer_engine": te}


def _generation_problems(cfg: RunConfig) -> list[str]:
    from .runtime.checkpointing import resolve_checkpoint

    load = cfg.checkpoint.load
    if load is None:
        return []  # config_problems says --load is required
    if resolve_checkpoint(load) is None:
        return [f"--load {load}: no checkpoint there"]
    if cfg.data.tokenizer_model is None:
        return [f"--load {load} names no tokenizer (sampo_model.json): pass --tokenizer-model"]
    return []


def _vocabulary(cfg: RunConfig, architecture, purpose: Purpose, log):
    """``(tokenizer, vocab_size, problems)``: the run's tokenizer (train, generate: loaded and checked
    against the checkpoint's own), and the model's vocabulary (``--vocab-size`` or the checkpoint's,
    else the tokenizer's size)."""
    from .data import load_tokenizer
    from .validation import tokenizer_problems

    vocab = cfg.model.vocab_size
    if purpose in ("dry_run", "model"):
        if vocab is None and cfg.data.tokenizer_model:
            vocab = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type).vocab_size
        if vocab is None:
            return None, None, ["--dry-run needs the vocabulary: give --vocab-size or --tokenizer-model"]
        return None, vocab, []
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    problems = tokenizer_problems(cfg, tokenizer, architecture, log)
    vocab = vocab or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab:  # a tokenizer bigger than the model: said before any data is read
        problems.append(
            f"--tokenizer-model {cfg.data.tokenizer_model}: the tokenizer has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary has only {vocab} (--vocab-size, or the checkpoint's sampo_model.json): use the model's own tokenizer"
        )
    return tokenizer, vocab, problems
