"""Core attention for the local spec on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` computes ``softmax(Q K^T / sqrt(d) + mask) V`` with
``baddbmm`` and ``bmm``, builds the causal mask again on every forward, and refuses packed
sequences (``packed_seq_params``). :class:`SDPACoreAttention` computes the same attention with
torch's fused kernel (flash / memory-efficient on GPU, a fused CPU kernel on CPU) and accepts
megatron-core's THD layout: ``query [t, np, hn]`` with ``cu_seqlens`` marking where each packed
sequence starts, attention confined to each sequence (block-diagonal causal, computed one
sequence at a time, so its cost is the sum of the squared lengths).

It is a ModuleSpec substitution for the local spec's ``core_attention`` (models/gpt.py): it has no
parameters, so checkpoints are unchanged, and the Transformer Engine spec is untouched.
``tests/test_attention.py`` checks outputs and gradients against megatron-core's
``DotProductAttention`` (fp32), and packed against unpacked sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class SDPACoreAttention(torch.nn.Module):
    """``DotProductAttention``'s interface and numerics on ``scaled_dot_product_attention``.

    Args:
        config: the ``TransformerConfig`` (heads, query groups, kv_channels, TP size, dropout).
        layer_number: 1-based layer index (only for ``apply_query_key_layer_scaling``, refused).
        attn_mask_type: causal for self-attention (the only type the decoder uses).
        attention_type: unused, as in megatron-core.
        attention_dropout: overrides ``config.attention_dropout``.
        softmax_scale: default ``1 / sqrt(kv_channels)``.
        cp_comm_type: context parallelism is refused (as the local spec does).
        pg_collection: process groups; its ``tp`` gives the heads per rank.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None, pg_collection=None) -> None:  # fmt: skip
        super().__init__()
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs --transformer-impl transformer_engine")
        if config.apply_query_key_layer_scaling or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPACoreAttention supports the vanilla softmax without query-key layer scaling")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPACoreAttention does not implement sliding-window attention")
        from megatron.core.transformer.enums import AttnMaskType

        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention implements causal self-attention, not {attn_mask_type}")
        tp_size = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.heads = config.num_attention_heads // tp_size
        self.groups = config.num_query_groups // tp_size
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                attn_mask_type=None, attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:  # fmt: skip
        """Attention over ``[s, b, n, d]`` (or THD ``[t, n, d]``) query/key/value.

        Returns:
            ``[s, b, np * hn]`` (THD: ``[t, np * hn]``), as ``DotProductAttention``.
        """
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention bias")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise ValueError(f"packed sequences in {packed_seq_params.qkv_format!r} format: only 'thd' is supported")
        if thd:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask, causal = self._mask(q.shape[2], k.shape[2], attention_mask, q.device)
        context = self._sdpa(q, k, v, mask, causal)
        # [b, np, s, hn] -> [s, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)

    def _sdpa(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.groups != self.heads,
        )  # fmt: skip

    def _packed(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """THD ``[t, n, d]``: causal attention inside each packed sequence, one SDPA call per sequence
        (the cost is the sum of the squared lengths, not the square of the row)."""
        starts = _sequence_starts(packed_seq_params, query.shape[0])
        # [t, n, d] -> [1, n, t, d]: batched 4-D inputs take torch's fused CPU kernel (3-D ones fall
        # back to the unfused math path)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        parts = [self._sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, True) for a, b in zip(starts[:-1], starts[1:])]
        # [1, n, t, d] -> [t, n * d]
        return torch.cat(parts, dim=2)[0].transpose(0, 1).reshape(query.shape[0], -1)

    @staticmethod
    def _mask(sq: int, sk: int, attention_mask, device) -> tuple[torch.Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for SDPA: True in ``attn_mask`` means "may attend"."""
        if attention_mask is not None:
            # megatron's convention: True means masked out.
            return ~attention_mask.to(torch.bool), False
        if sq == sk:
            return None, True
        if sq == 1:  # a decode step with the key/value cache attends every cached key
            return None, False
        # A query block at the end of a longer key sequence (chunked prefill): bottom-right causal.
        offset = sk - sq
        rows = torch.arange(sq, device=device)[:, None] + offset
        return torch.arange(sk, device=device)[None, :] <= rows, False


def _sequence_starts(packed_seq_params, total: int) -> list[int]:
    """Where each packed sequence starts, and ``total``: read once per forward (every layer shares
    the ``PackedSeqParams``), with trailing tokens past the last sequence as one more."""
    starts = getattr(packed_seq_params, "_sequence_starts", None)
    if starts is None:
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        starts = [int(x) for x in cu.tolist()]
        if starts[-1] > total:
            raise ValueError(f"cu_seqlens end at {starts[-1]}, past the {total} tokens of the packed row")
        if starts[-1] < total:
            starts.append(total)
        packed_seq_params._sequence_starts = starts
    return starts


def _tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
