"""Full (TP=1, PP=1) parameter names and values <-> this rank's shards of a GPTModel chunk.

Used for a layout-independent random initialisation, and to gather full tensors for comparisons.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist


def global_param_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Map a GPTModel chunk's local parameter names to global (TP=1, PP=1) names.

    Decoder layers are renamed by their global layer number; the last stage's copy of tied
    embeddings maps to the embedding's name.
    """
    names = {}
    for local_name, _ in chunk.named_parameters():
        name = local_name
        if local_name.startswith("decoder.layers."):
            index, rest = local_name[len("decoder.layers.") :].split(".", 1)
            layer_number = chunk.decoder.layers[int(index)].layer_number  # global, 1-based
            name = f"decoder.layers.{layer_number - 1}.{rest}"
        elif local_name == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
            name = "embedding.word_embeddings.weight"
        names[local_name] = name
    return names


def _is_glu_fc1(name: str, param: torch.Tensor) -> bool:
    # SwiGLU fc1 holds [gate; up]; each TP rank holds [gate shard; up shard], not one slice.
    return name.endswith("mlp.linear_fc1.weight") and getattr(param, "tensor_model_parallel", False)


def _is_gated(chunk: torch.nn.Module) -> bool:
    return bool(getattr(chunk.config, "gated_linear_unit", False))


def full_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def shard_of(full: torch.Tensor, name: str, param: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """This TP rank's shard of a full tensor, in megatron-core's layout for ``param``."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if gated and _is_glu_fc1(name, param):
        return torch.cat([half.chunk(size, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(size, dim)[rank]


def gather_full(local: torch.Tensor, name: str, param: torch.Tensor, tp_group, gated: bool) -> torch.Tensor:
    """Inverse of :func:`shard_of`: all-gather over the TP group and undo the GLU layout."""
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.detach().contiguous(), group=tp_group)
    dim = param.partition_dim
    if gated and _is_glu_fc1(name, param):
        gates, ups = zip(*(p.chunk(2, dim) for p in parts))
        return torch.cat([*gates, *ups], dim)
    return torch.cat(parts, dim)


def initial_value(name: str, shape: list[int], *, seed: int, std: float, num_layers: int, vocab_size: int) -> torch.Tensor:
    """The full initial value of parameter ``name``: a function of (seed, name) only.

    Norm scales are 1 and biases 0; other weights are N(0, std), with megatron's scaled init
    ``std / sqrt(2 L)`` for the layers that write into the residual stream. Vocabulary rows beyond
    ``vocab_size`` (the padding) are 0, so the values do not depend on the padded size.
    """
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "layernorm" in name or name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        value = torch.zeros(shape)
        value[:vocab_size] = torch.randn([vocab_size, *shape[1:]], generator=gen) * std
        return value
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def initialize_deterministically(chunks: list[torch.nn.Module], *, seed: int, vocab_size: int) -> None:
    """Give every parameter its layout-independent initial value (see :func:`initial_value`).

    Every TP x PP x VPP layout gets the same full model; the cost is one full tensor per parameter
    at a time, which suits the small randomly initialised models this is for.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        names = global_param_names(chunk)
        cfg = chunk.config
        for local_name, param in chunk.named_parameters():
            name = names[local_name]
            full = initial_value(
                name, full_shape(param, tp_size), seed=seed, std=cfg.init_method_std,
                num_layers=cfg.num_layers, vocab_size=vocab_size,
            )  # fmt: skip
            param.copy_(shard_of(full, name, param, tp_rank, tp_size, _is_gated(chunk)))
