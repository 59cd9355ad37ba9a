"""Per-step metrics: a console line, a JSONL file, TensorBoard scalars and W&B (on one logging rank)."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from .nonfinite import sanitize_metrics

if TYPE_CHECKING:
    from .wandb_writer import WandbWriter

# Console columns, in order; everything else goes to the file and TensorBoard only.
_CONSOLE = (
    ("loss", "loss", "{:.5f}"),
    ("rewards/margins", "margins", "{:+.4f}"),
    ("rewards/accuracies", "acc", "{:.2f}"),
    ("rewards_full/margins", "margins_full", "{:+.4f}"),
    ("lengths/chosen", "T_w", "{:.1f}"),
    ("lengths/rejected", "T_l", "{:.1f}"),
    ("lengths/kept", "T_m", "{:.1f}"),
    ("lr", "lr", "{:.3e}"),
    ("grad_norm", "grad_norm", "{:.4f}"),
    ("pairs_per_s", "pairs/s", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("padding_fraction", "padding", "{:.3f}"),
    ("pack/sequences_per_row", "seqs/row", "{:.2f}"),
    # the verbosity monitor's steps (training/monitor.py)
    ("eval/length_mean", "eval_len", "{:.1f}"),
    ("eval/rewards/margins", "eval_margins", "{:+.4f}"),
    ("eval/rewards_full/margins", "eval_margins_full", "{:+.4f}"),
    ("eval/rewards_full/accuracies_chosen_longer", "eval_acc_longer", "{:.2f}"),
    ("eval/rewards_full/accuracies_chosen_shorter", "eval_acc_shorter", "{:.2f}"),
    ("eval/rewards_full/margin_length_corr", "eval_margin_len_corr", "{:+.3f}"),
)


class MissingPackageError(RuntimeError):
    """A flag needs an optional package that is not installed (the message says how to install it)."""


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def prepare_metrics_file(path: str, start_iteration: int) -> str | None:
    """Make ``path`` ready for a run that starts after ``start_iteration`` (0: a fresh run); returns a
    line saying what was done, or None.

    A fresh run never appends to an earlier run's file: an existing non-empty file is moved aside to
    ``path.1`` (``.2``, ... when taken). A resumed run keeps the lines up to ``start_iteration`` and
    drops the rest (steps after the checkpoint, which the run computes again, and a line cut short
    by a crash), so the file holds each iteration once.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    if start_iteration == 0:
        n = 1
        while os.path.exists(f"{path}.{n}"):
            n += 1
        os.replace(path, f"{path}.{n}")
        return f"metrics: {path} held an earlier run's metrics: moved to {path}.{n}"
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(record, dict) and record.get("iteration", 0) <= start_iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if not dropped:
        return None
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return f"metrics: {path}: dropped {dropped} line(s) past the resumed iteration {start_iteration}"


def reduce_step_metrics(losses_reduced: list[dict], dp_group) -> dict[str, float]:
    """Per-pair means over the global batch of the metric sums each micro-batch's loss returned
    (training/step.py), summed over data parallelism. Call on the last pipeline stage."""
    names = sorted(losses_reduced[0]["sums"])
    device = losses_reduced[0]["sums"][names[0]].device if names else torch.device("cpu")
    totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    for out in losses_reduced:
        totals[:-1] += torch.stack([out["sums"][n].to(device) for n in names])
        totals[-1] += out["pairs"]
    dist.all_reduce(totals, group=dp_group)
    totals = totals.cpu()
    return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class MetricsLogger:
    """Writes metrics from the logging rank only; every other rank gets a no-op logger.

    Args:
        enabled: whether this rank logs.
        total_iters: for the ``iteration k/N`` prefix.
        log_interval: console line every N steps (the file and TensorBoard get every step).
        metrics_file: JSONL path (see :func:`prepare_metrics_file`).
        tensorboard_dir: TensorBoard log directory.
        start_iteration: the iteration the run starts after (0: fresh).
        wandb: builds the W&B writer (training/wandb_writer.py), called on the logging rank only.
    """

    def __init__(
        self,
        enabled: bool,
        total_iters: int,
        log_interval: int = 1,
        metrics_file: str | None = None,
        tensorboard_dir: str | None = None,
        start_iteration: int = 0,
        wandb: Callable[[], WandbWriter] | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_iters = total_iters
        self.log_interval = max(1, log_interval)
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            done = prepare_metrics_file(metrics_file, start_iteration)
            if done:
                print(done, flush=True)
            self._file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise MissingPackageError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from err
            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb is not None:
            self._wandb = wandb()

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, "time": time.time(), **metrics}
        if self._file is not None:
            # NaN / Inf become null: JSON has no literal for them (the file stays valid JSON).
            self._file.write(json.dumps(sanitize_metrics(record), allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, iteration)
        if self._wandb is not None:
            self._wandb.log(iteration, metrics)
        if iteration % self.log_interval == 0 or iteration == self.total_iters or "nonfinite" in metrics:
            fields = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in _CONSOLE if key in metrics]
            if "time/elapsed_s" in metrics:
                fields.append(f"elapsed {format_duration(metrics['time/elapsed_s'])}")
            if "time/eta_s" in metrics:
                fields.append(f"ETA {format_duration(metrics['time/eta_s'])}")
            if "nonfinite" in metrics:
                fields.append(f"NOT FINITE: {metrics['nonfinite']}")
            print(f"iteration {iteration:>6d}/{self.total_iters} | " + " | ".join(fields), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
