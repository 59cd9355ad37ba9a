"""What megatron-core's local spec (no Transformer Engine, no Apex) needs to train here, on both
tested release lines (0.16, 0.19); models/gpt.py applies these and nothing else.

- **Sequence parallelism with torch norms.** ``WrappedTorchNorm`` (what the local spec uses for
  RMSNorm, and for LayerNorm without Apex) asserts ``not config.sequence_parallel``
  (``transformer/torch_norm.py``, :data:`SITES`). :class:`SequenceParallelTorchNorm` builds it
  without the flag and marks its parameters ``sequence_parallel``, as Apex's and TE's norms are, so
  ``finalize_model_grads`` all-reduces their partial gradients over TP.
- **fp32 parameters in a bf16/fp16 model.** The torch norms are built in fp32 whatever
  ``params_dtype`` says, and the mixed-precision optimizer's checkpoint maps only its float16
  groups (``dist_checkpointing/optimizer.py``: "Param id .. does not match any model sharded
  param"). :func:`cast_float32_params` gives them the model's dtype, as Megatron-LM's
  ``Float16Module`` does.
- **Batched p2p on gloo.** ``batch_p2p_comm`` (batched isend/irecv between pipeline stages) gave
  wrong gradients with interleaving on gloo (docs/compatibility.md): :func:`batch_p2p_comm` is on
  only with CUDA (NCCL).

:func:`check_local_spec` asserts that each site is still what these rely on.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import torch

SITES: dict[str, dict[str, str]] = {
    "0.16": {
        "torch_norm_assert": "transformer/torch_norm.py:32 (WrappedTorchNorm.__new__)",
        "final_norm": "transformer/transformer_block.py:69 (LayerNormImpl = WrappedTorchNorm)",
        "fp16_param_map": "dist_checkpointing/optimizer.py:145",
    },
    "0.19": {
        "torch_norm_assert": "transformer/torch_norm.py:50 (WrappedTorchNorm.__new__)",
        "final_norm": "transformer/transformer_block.py:64 (LayerNormImpl = WrappedTorchNorm)",
        "fp16_param_map": "dist_checkpointing/optimizer.py:145",
    },
}
"""Where each workaround's reason lives, per release line (re-survey when a line is added)."""


@functools.cache
def check_local_spec() -> None:
    """Raise CompatError when a site the workarounds rely on has moved or changed (once per process)."""
    from megatron.core.dist_checkpointing import optimizer as dist_optimizer
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from .cpu import CompatError
    from .version import release_line

    line = release_line().name
    missing = []
    if "sequence_parallel" not in inspect.getsource(WrappedTorchNorm):
        missing.append("WrappedTorchNorm's sequence_parallel check")
    for name in ("LayerNormImpl", "get_num_layers_to_build", "TransformerBlockSubmodules"):
        if not hasattr(transformer_block, name):
            missing.append(f"transformer_block.{name}")
    if "does not match any model sharded param" not in inspect.getsource(dist_optimizer):
        missing.append("dist_checkpointing.optimizer's fp16 parameter map")
    if missing:
        raise CompatError(
            f"megatron-core {line}: {', '.join(missing)} not found (sites: {SITES.get(line)}); "
            "re-survey sampo_megatron/compat/local_spec.py"
        )


class SequenceParallelTorchNorm:
    """megatron-core's ``WrappedTorchNorm`` (``torch.nn.LayerNorm`` / ``RMSNorm``) under sequence
    parallelism. A norm acts per token, so its forward is already right on a sequence-sharded
    input; only its parameters' gradients are partial sums over each TP rank's tokens, which the
    ``sequence_parallel`` mark has ``finalize_model_grads`` all-reduce over TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        local = copy.copy(config)  # WrappedTorchNorm's checks minus sequence parallelism
        local.sequence_parallel = False
        norm = WrappedTorchNorm(local, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec, config, vp_stage: int | None):
    """The block spec for ``spec``'s layers with every ``WrappedTorchNorm`` (the layers' and the
    final norm, which megatron-core picks itself) replaced by :class:`SequenceParallelTorchNorm`.
    Specs whose norms support sequence parallelism (Transformer Engine, Apex) come back unchanged."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    submodules = spec.submodules
    norms = {
        f.name: SequenceParallelTorchNorm
        for f in dataclasses.fields(submodules)
        if getattr(submodules, f.name) is WrappedTorchNorm
    }
    final_norm = transformer_block.LayerNormImpl
    if not norms and final_norm is not WrappedTorchNorm:
        return spec
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(submodules, **norms))
    return transformer_block.TransformerBlockSubmodules(
        layer_specs=[layer] * transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=SequenceParallelTorchNorm if final_norm is WrappedTorchNorm else final_norm,
    )


def cast_float32_params(chunk: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the fp32 parameters of a bf16/fp16 model ``dtype`` (see the module docstring)."""
    if dtype == torch.float32:
        return
    for param in chunk.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(dtype)


def batch_p2p_comm() -> bool:
    """``TransformerConfig.batch_p2p_comm``: batched pipeline p2p only on CUDA (NCCL), not on gloo."""
    return torch.cuda.is_available()
