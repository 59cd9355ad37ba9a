"""Output logits only at the positions the loss reads (response tokens), not at prompt or padding.

megatron-core's ``GPTModel`` projects every position through the output layer (``[s, b, V/TP]``),
although a preference loss needs log-probs only where the target is a response token. With a small
model and a large vocabulary the output layer is a large share of the FLOPs (hidden 256, vocab
8000: ~40%), and the logits are the largest activation. :func:`select_output_positions` makes the
next forward of a model chunk feed the output layer only the selected hidden states: the chunk then
returns ``[1, n, V/TP]`` logits for the ``n`` selected positions, in the order of
``positions.nonzero()`` over ``[s, b]`` (sequence first, as megatron's activations).

It works through a forward pre-hook on ``output_layer`` (no module is replaced, so parameter names
and checkpoints are unchanged). With ``project=False`` the output layer returns the selected hidden
states themselves, ``[1, n, h]`` from the chunk, for an op that projects them itself
(ops/fused_logprobs.py: the logits are never materialised). Tensor parallelism is unaffected (the output layer stays
vocab-parallel); under sequence parallelism the output layer's input is sharded over the sequence,
so the hook gathers it first (compat/output_layer.py: its backward keeps this rank's slice, the
output layer's own backward then all-reduces the input gradient over TP, as for any replicated input).
"""

from __future__ import annotations

import torch

from ..compat.output_layer import check_output_layer, gather_sequence_parallel_input, restore_sequence_parallel


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _select_hidden(layer, args, kwargs):
    positions = layer._sampo_positions
    if positions is None:
        return None
    layer._sampo_positions = None  # one forward only
    hidden, layer._sampo_restore_sequence_parallel = gather_sequence_parallel_input(layer, args[0])
    s, b, h = hidden.shape
    if positions.shape != (s, b):
        raise ValueError(f"selected positions {tuple(positions.shape)} do not match the hidden states [s, b] = {(s, b)}")
    flat = positions.reshape(-1).nonzero().squeeze(1)
    selected = hidden.reshape(s * b, h).index_select(0, flat).unsqueeze(1)  # [n, 1, h]
    return (selected, *args[1:]), kwargs


def _restore(layer, args, kwargs, output):
    if getattr(layer, "_sampo_restore_sequence_parallel", False):
        restore_sequence_parallel(layer)
        layer._sampo_restore_sequence_parallel = False
    kept = layer._sampo_kept
    if kept is not None:  # the input after the selection (and the sequence-parallel gather)
        kept.append(args[0].detach())
        layer._sampo_kept = None
    return output


def install_output_selection(chunk) -> None:
    """Let :func:`select_output_positions` act on this model chunk (a no-op without an output layer,
    i.e. on stages other than the last pipeline stage). Installs the hooks once."""
    model = _unwrap(chunk)
    layer = getattr(model, "output_layer", None)
    if layer is None or not getattr(model, "post_process", False) or hasattr(layer, "_sampo_positions"):
        return
    check_output_layer(layer)
    layer._sampo_positions = None
    layer._sampo_restore_sequence_parallel = False
    layer._sampo_kept = None
    layer._sampo_project = True
    layer.register_forward_pre_hook(_select_hidden, with_kwargs=True)
    layer.register_forward_hook(_restore, with_kwargs=True)
    layer.forward = _projecting_forward(layer, layer.forward)


def _projecting_forward(layer, project):
    """The output layer's forward, or (once, after ``select_output_positions(..., project=False)``)
    its input unchanged, as the ``(output, bias)`` pair megatron-core's GPTModel unpacks
    (compat/output_layer.py checks that it returns the first element as the chunk's output)."""

    def forward(input_, *args, **kwargs):
        if layer._sampo_project:
            return project(input_, *args, **kwargs)
        layer._sampo_project = True  # one forward only
        return input_, None

    return forward


def select_output_positions(chunk, positions: torch.Tensor, project: bool = True) -> bool:
    """Compute the next forward's logits only at ``positions`` (bool ``[s, b]``).

    Args:
        project: False: the chunk's next output is the selected final hidden states ``[1, n, h]``
            (whole over sequence parallelism), not their logits.

    Returns:
        True when the chunk has an output layer with the selection installed (its next output is
        ``[1, n, V/TP]``, or ``[1, n, h]``), False otherwise (nothing changes; its output is hidden
        states or full logits).
    """
    layer = getattr(_unwrap(chunk), "output_layer", None)
    if layer is None or not hasattr(layer, "_sampo_positions"):
        return False
    layer._sampo_positions = positions
    layer._sampo_project = project
    return True


def keep_output_input(chunk) -> list[torch.Tensor] | None:
    """Keep the input of the chunk's next output-layer call: after :func:`select_output_positions`,
    the final hidden states at the selected positions, ``[n, 1, h]``, whole over sequence parallelism
    (TDPO's reference: its logits are recomputed from them in the policy's loss, one micro-batch at a
    time, instead of keeping ``[n, V/TP]`` logits for every micro-batch of the step).

    Returns:
        A list the next forward appends the (detached) tensor to; ``None`` when the chunk has no
        output layer with the selection installed (stages other than the last).
    """
    layer = getattr(_unwrap(chunk), "output_layer", None)
    if layer is None or not hasattr(layer, "_sampo_positions"):
        return None
    layer._sampo_kept = []
    return layer._sampo_kept


def output_weight(chunk) -> torch.Tensor:
    """The ``[V/TP, h]`` output-layer weight of the last model chunk (the word embedding's copy on the
    last stage when the two are tied)."""
    model = _unwrap(chunk)
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
