"""What the response-logits hook (models/response_logits.py) relies on in megatron-core's output
layer, a ``ColumnParallelLinear``, in both tested release lines (0.16, 0.19).

Under sequence parallelism the output layer's input is sharded over the sequence and its forward
all-gathers it (``layers.py`` ``ColumnParallelLinear.forward`` reads ``self.sequence_parallel`` at
call time: 0.16 ``layers.py:912``, 0.19 ``layers.py:1058``). The hook selects response positions
from the whole sequence, so it gathers first (over ``self.tp_group``) and switches the layer's own
gather off for that one call. :func:`check_output_layer` asserts that the layer still has those
attributes and still reads the flag in ``forward``, and that ``GPTModel`` still returns the output
layer's first output (transposed to ``[b, s, ...]``) when it gets no labels: ``--fused-logprobs``
has the layer return its input there (0.16 ``gpt_model.py:685``/``712``, 0.19 ``:762``/``792``).
"""

from __future__ import annotations

import inspect

import torch


def check_output_layer(layer: torch.nn.Module) -> None:
    """Raise CompatError when ``layer`` lacks what :func:`gather_sequence_parallel_input` needs."""
    from megatron.core.models.gpt import gpt_model

    from .cpu import CompatError
    from .version import release_line

    missing = [name for name in ("sequence_parallel", "tp_group") if not hasattr(layer, name)]
    if not missing and "self.sequence_parallel" not in inspect.getsource(type(layer).forward):
        missing.append("forward reading self.sequence_parallel")
    # --fused-logprobs: the output layer's first output is what the chunk returns (no labels), transposed
    model_source = inspect.getsource(gpt_model.GPTModel)
    if "logits, _ = self.output_layer(" not in model_source or "return logits.transpose(0, 1).contiguous()" not in model_source:
        missing.append("GPTModel returning the output layer's first output (transposed) without labels")
    if missing:
        raise CompatError(
            f"megatron-core {release_line().name}: the output layer {type(layer).__name__} lacks {missing}; "
            "re-survey sampo_megatron/compat/output_layer.py"
        )


def gather_sequence_parallel_input(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The whole-sequence input of ``layer`` and whether its own gather was switched off.

    With sequence parallelism off, ``hidden`` is returned as it is. Otherwise it is all-gathered
    over the layer's TP group and ``layer.sequence_parallel`` is set to False until
    :func:`restore_sequence_parallel`. The grad of the gathered copy is complete on every rank (the
    output layer all-reduces its input grad when sequence parallelism is off), so the backward of
    the gather only keeps this rank's slice.
    """
    if not layer.sequence_parallel:
        return hidden, False
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=layer.tp_group)
    layer.sequence_parallel = False
    return hidden, True


def restore_sequence_parallel(layer: torch.nn.Module) -> None:
    """Undo :func:`gather_sequence_parallel_input`'s switch."""
    layer.sequence_parallel = True
