"""GPT-NeoX's parallel residual transformer layer on megatron-core.

GPT-NeoX / Pythia compute ``x + attention(ln1(x)) + mlp(ln2(x))``: both branches read the layer's
input. megatron-core's :class:`TransformerLayer` only has the sequential form
``h = x + attention(ln1(x)); h + mlp(ln2(h))``. The subclass below reuses every submodule of the
parent (so parameter names, sharded checkpoint keys, tensor parallelism, sequence parallelism and
both the local and the Transformer Engine specs stay as they are) and only changes what the MLP
branch reads.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_layer import TransformerLayer


class ParallelResidualTransformerLayer(TransformerLayer):
    """A :class:`TransformerLayer` whose MLP branch reads the layer input (GPT-NeoX).

    ``pre_mlp_layernorm`` (or, with the Transformer Engine spec, the norm fused into
    ``mlp.linear_fc1``) is applied to the layer input rather than to the attention output. The
    attention branch is the parent's; the MLP output and its bias are then added to
    ``x + attention(ln1(x))`` by the parent's bias-dropout-add, so dropout and bias handling are
    unchanged. The parent's MLP-only options (selective recomputation of the MLP or its norm, MLP
    chunking for inference prefill, MoE CUDA graphs) are not taken here; the trainer uses none of
    them, and whole-layer recomputation wraps this forward as it wraps the parent's.
    """

    def forward(self, *args: Any, **kwargs: Any):
        """Same signature and outputs as :meth:`TransformerLayer.forward`."""
        kwargs.pop("dynamic_inference_decode_only", None)
        layer_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        # x + attention(ln1(x)) (bias and dropout applied), plus the cross-attention no-op.
        with_attention, context = self._forward_attention(*args, **kwargs)
        # The MLP branch reads the layer input, not the attention output.
        mlp_input = self._forward_pre_mlp_layernorm(layer_input)
        mlp_output_with_bias = self.mlp(mlp_input, padding_mask=kwargs.get("padding_mask"))
        # residual + dropout(mlp + bias), with residual = x + attention(ln1(x)).
        return self._forward_post_mlp(mlp_output_with_bias, with_attention), context
