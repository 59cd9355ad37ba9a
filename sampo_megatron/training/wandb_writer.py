"""Weights & Biases logging (``--wandb-project``), an optional dependency:
``pip install 'sampo-megatron[wandb]'``.

The logging rank sends W&B exactly what it writes to ``--metrics-file``: every numeric metric of
every step, at ``step=iteration``. The flags are Megatron-LM's (``--wandb-project``,
``--wandb-exp-name``, ``--wandb-save-dir``); W&B's own environment variables apply as usual
(``WANDB_MODE=offline`` on a cluster without network, then ``wandb sync``). Each launch is one W&B
run, as in Megatron-LM; a resumed launch starts a new one, named alike.
"""

from __future__ import annotations

import os

from .metrics import MissingPackageError


class WandbWriter:
    """One W&B run.

    Args:
        project: ``--wandb-project``.
        name: ``--wandb-exp-name`` (W&B picks a name when empty).
        save_dir: ``--wandb-save-dir``: W&B writes its ``wandb/`` directory here (created).
        config: the run's resolved configuration, shown with the run.
    """

    def __init__(self, project: str, name: str | None, save_dir: str, config: dict) -> None:
        try:
            import wandb
        except ImportError as err:
            raise MissingPackageError(
                "--wandb-project needs the wandb package: pip install 'sampo-megatron[wandb]' (or pip install wandb)"
            ) from err
        os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=project, name=name or None, dir=save_dir, config=config)

    def log(self, iteration: int, metrics: dict) -> None:
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(values, step=iteration)

    def close(self) -> None:
        self.run.finish()


def wandb_save_dir(save_dir: str | None, checkpoint_save: str | None) -> str:
    """``--wandb-save-dir``, else ``<--save>/wandb`` (Megatron-LM's default), else ``./wandb``."""
    if save_dir:
        return save_dir
    return os.path.join(checkpoint_save, "wandb") if checkpoint_save else "wandb"

