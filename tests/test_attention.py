"""The local spec's core attention on torch SDPA (models/attention.py) against megatron-core's
DotProductAttention, and packed (THD) sequences against each sequence alone."""

import json

import pytest
import torch

from sampo_megatron.models.attention import SDPACoreAttention

from helpers import assert_same_steps, run_torchrun, train


def block_causal_mask(starts: list[int], total: int) -> torch.Tensor:
    """The reference: True where query i may attend key j (j <= i, same sequence)."""
    seq = torch.zeros(total, dtype=torch.long)
    for n, (a, b) in enumerate(zip(starts, starts[1:] + [total])):
        seq[a:b] = n
    position = torch.arange(total)
    return (seq[:, None] == seq[None, :]) & (position[None, :] <= position[:, None])


def test_packed_attention_equals_a_dense_block_diagonal_mask():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0)

    class OneRank:
        def size(self):
            return 1

    tp = type("Groups", (), {"tp": OneRank()})()
    attention = SDPACoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp)
    gen = torch.Generator().manual_seed(0)
    total = 12  # sequences of 5, 4 and 1 tokens, then 2 of padding
    q = torch.randn(total, 4, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(total, 2, 8, generator=gen, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 5, 9, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    out = attention(q, k, v, None, packed_seq_params=params)
    mask = block_causal_mask([0, 5, 9, 10], total)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.repeat_interleave(2, 1).transpose(0, 1)[None], v.repeat_interleave(2, 1).transpose(0, 1)[None],
        attn_mask=mask, scale=8**-0.5,
    )[0].transpose(0, 1).reshape(total, -1)  # fmt: skip
    assert out.shape == (total, 32)
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq,sk", [(4, 4), (1, 6), (2, 6)])
def test_mask_for_self_attention_decode_and_chunked_prefill(sq, sk):
    mask, causal = SDPACoreAttention._mask(sq, sk, None, torch.device("cpu"))
    q, k = torch.randn(1, 1, sq, 8), torch.randn(1, 1, sk, 8)
    dense = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # query i sees keys up to i + (sk - sq)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask, is_causal=causal)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=dense)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc,flags", [(1, []), (2, ["--tp", "2", "--sp"])], ids=["tp1", "tp2_sp"])
def test_sdpa_equals_megatron_attention_and_packing_equals_alone(tmp_path, nproc, flags):
    out = tmp_path / "attention.json"
    run_torchrun("attention_worker.py", nproc, *flags, "--out", str(out))
    result = json.loads(out.read_text())
    assert result["logits_rel"] < 1e-5 and result["grad_rel"] < 1e-5, result
    assert result["packed_rel"] < 1e-5, result
    # no attention across sequences: perturbing one leaves the others bitwise equal
    assert result["perturbed_equal"] and result["perturbed_changed"], result


@pytest.mark.multiprocess
def test_trainer_steps_equal_with_megatron_attention_at_pp2(tmp_path):
    flags = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", "--train-iters", "2"]
    sdpa, _ = train(tmp_path, "sdpa", 2, *flags)
    megatron, _ = train(tmp_path, "megatron", 2, *flags, "--local-attention", "megatron")
    assert len(sdpa) == 2
    assert_same_steps(sdpa, megatron, rel=1e-5)
