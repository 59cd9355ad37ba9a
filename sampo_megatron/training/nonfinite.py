"""Non-finite loss and gradient detection (Megatron's ``--check-for-nan-in-loss-and-grad``).

After the forward/backward of a step and before the optimizer step, every rank looks at what it
holds (the last pipeline stage: the loss and metric sums of its micro-batches; every rank: the
gradients of its parameters, already reduced over data parallelism) and the flags are combined with
a MAX all-reduce over all ranks, so that all of them take the same decision:

- stop (default): :class:`NonFiniteError` naming the iteration and what was not finite, before the
  optimizer step and before any save, so the latest checkpoint marker keeps naming the last sound
  checkpoint;
- skip (``--skip-nonfinite-steps``): no update and no scheduler step; the trainer counts it.

The gradient check is one extra pass over the gradients (a norm per parameter), about
the cost of the gradient-norm computation megatron-core's optimizer already makes.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

# Fault injection for the tests: make the gradients non-finite at this (1-based) iteration.
_TEST_NAN_GRAD_AT_ENV = "SAMPO_TEST_NAN_GRAD_AT"


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite."""


def _grad_norm_sum(model_chunks) -> torch.Tensor:
    """Sum of the per-parameter gradient norms of this rank (megatron DDP keeps the gradients in
    ``param.main_grad``): finite exactly when every gradient is. Stays on the gradients' device
    until the caller reads it (one synchronisation per step)."""
    norms = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(norms).double().sum()


def nonfinite_parts(iteration: int, model_chunks, loss_values: list[float]) -> list[str]:
    """What is not finite at this step, the same list on every rank (collective).

    Args:
        iteration: the 1-based iteration, for the fault-injection hook.
        model_chunks: this rank's DDP-wrapped model chunks (gradients already reduced).
        loss_values: the loss and metric values this rank computed (empty off the last stage).
    """
    if os.environ.get(_TEST_NAN_GRAD_AT_ENV) == str(iteration):
        for chunk in model_chunks:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                if grad is not None:
                    grad.fill_(float("nan"))
                    break
    flags = torch.tensor(
        [
            float(any(not math.isfinite(v) for v in loss_values)),
            float(not bool(torch.isfinite(_grad_norm_sum(model_chunks)).item())),
        ],
        dtype=torch.float64,
    )
    if dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.cpu()
    return [name for name, flag in zip(("loss", "gradient norm"), flags.tolist()) if flag]


def nonfinite_message(iteration: int, parts: list[str]) -> str:
    return (
        f"iteration {iteration}: the {' and the '.join(parts)} {'is' if len(parts) == 1 else 'are'} not finite (NaN or Inf). "
        "Stopped before the optimizer step: nothing of this state was saved and the latest checkpoint marker still "
        "names the last sound checkpoint. Lower --lr, check the data, or pass --skip-nonfinite-steps to skip such steps."
    )


def sanitize_metrics(metrics: dict) -> dict:
    """Non-finite floats become None (``null`` in the JSONL file, which stays valid JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
