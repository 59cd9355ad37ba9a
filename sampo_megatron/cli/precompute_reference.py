"""Compute the reference log-prob cache without training (``sampo-precompute-reference``,
``tools/precompute_reference.py``).

    torchrun --nproc-per-node N tools/precompute_reference.py --config run.yaml --ref-cache-dir DIR [--flags]

It takes the training command's flags (``--ref-mode cache`` is implied) and computes the cache of
the reference's first version (before any ``--ref-update epoch`` update): per-token log-probs of
every pair, then exits. Any training run that reads the same pairs with the same tokenizer,
``--seq-length`` and reference (``--ref-load``, ``--load`` or the seeded initialisation) uses it
through ``--ref-mode cache --ref-cache-dir DIR``, at any TP/PP/DP layout and with any loss or length
debias; a run that differs in any of those refuses it and names what changed
(training/reference_cache.py). A complete cache is left as it is.

The run is built as training builds it (policy, optimizer and, while the cache is computed, the
reference): the memory is that of the first step of a ``--ref-mode cache`` training run.
"""

from __future__ import annotations

import os
import sys

from .train import exit_with, user_errors


def precompute(plan) -> None:
    """Build the run of ``plan`` as training would, compute the cache of version 0 unless it is
    complete (and this run's), close."""
    from ..training.trainer import Trainer

    cfg = plan.config
    trainer = Trainer(plan)
    completed = False
    try:
        trainer.reference.on_step(0, 0)
        trainer.logger.message(
            f"reference cache complete: {os.path.abspath(cfg.reference.ref_cache_dir)} ({trainer.feed.num_pairs} pairs, "
            f"--seq-length {cfg.training.seq_length}); train with --ref-mode cache --ref-cache-dir {cfg.reference.ref_cache_dir}"
        )  # fmt: skip
        completed = True
    finally:
        trainer.close(synchronize=completed)


def main(argv: list[str] | None = None) -> None:
    from ..config import parse_config
    from ..losses import LOSSES
    from ..validation import ConfigError

    errors = user_errors()
    try:
        cfg = parse_config([*(sys.argv[1:] if argv is None else argv), "--ref-mode", "cache"])
        if not cfg.reference.ref_cache_dir:
            raise ConfigError("tools/precompute_reference.py needs --ref-cache-dir (where the cache goes)")
        if LOSSES[cfg.loss.loss_type].reference_free:
            raise ConfigError(f"--loss-type {cfg.loss.loss_type} reads no reference: there is nothing to precompute")
        from ..plan import resolve

        precompute(resolve(cfg))
    except errors as err:
        exit_with(err)
