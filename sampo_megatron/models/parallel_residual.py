"""GPT-NeoX's parallel residual transformer layer on megatron-core.

GPT-NeoX / Pythia compute ``x + attention(ln1(x)) + mlp(ln2(x))``: both branches read the layer's
input. megatron-core's :class:`TransformerLayer` only has the sequential form
``h = x + attention(ln1(x)); h + mlp(ln2(h))``. The subclass below changes one thing: the MLP
branch's norm reads ``x`` instead of ``h``. The residual the MLP output is added to stays ``h``, so
the parent computes ``h + mlp(ln2(x)) = x + attention(ln1(x)) + mlp(ln2(x))``.

It does so with public interfaces only (no private method of the parent, whose names move between
megatron-core releases): the layer's own ``forward`` records its input, and a forward pre-hook on
its ``pre_mlp_layernorm`` submodule (a spec field name, stable across releases) hands that input to
the norm in place of ``h``. Every submodule of the parent is reused, so parameter names, sharded
checkpoint keys, tensor and sequence parallelism and both the local and the Transformer Engine specs
stay as they are (with TE, the MLP norm is fused into ``mlp.linear_fc1`` and ``pre_mlp_layernorm``
is an identity module: the hook then passes ``x`` to the fused norm). Recomputation of the whole
layer re-runs ``forward`` and so records the input again. Recomputing the MLP norm alone (megatron's
``recompute_modules`` "layernorm"/"mlp_norm", which the trainer does not use) would run the norm in
backward, outside the layer's forward: the hook refuses that with an error rather than guess.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def _mlp_norm_reads_layer_input(norm: torch.nn.Module, args: tuple) -> tuple | None:
    layer_input = norm._parallel_residual_input
    if layer_input is None:
        raise RuntimeError("parallel residual: the MLP norm ran outside its layer's forward")
    return (layer_input, *args[1:])


class ParallelResidualTransformerLayer(TransformerLayer):
    """A :class:`TransformerLayer` whose MLP branch reads the layer input (GPT-NeoX)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        norm = self.pre_mlp_layernorm
        norm._parallel_residual_input = None
        norm.register_forward_pre_hook(_mlp_norm_reads_layer_input)

    def forward(self, *args: Any, **kwargs: Any):
        """Same signature and outputs as :meth:`TransformerLayer.forward`."""
        norm = self.pre_mlp_layernorm
        norm._parallel_residual_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        try:
            return super().forward(*args, **kwargs)
        finally:
            norm._parallel_residual_input = None
