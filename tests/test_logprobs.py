"""Single-process checks of the vocab-parallel log-prob and KL ops against float64 references."""

import pytest
import torch

from sampo_megatron.ops import vocab_parallel_kl, vocab_parallel_logprobs

from reference import kl_reference, logprobs_reference, max_rel_error


def _inputs(dtype, s=24, b=3, v=301, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, b, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, v, (s, b), generator=gen)
    grad = torch.randn(s, b, generator=gen, dtype=torch.float64)
    return logits, target, grad


def _value_and_grad(fn, logits, target, grad):
    x = logits.clone().requires_grad_(True)
    out = fn(x, target)
    (out.double() * grad).sum().backward()
    return out.detach(), x.grad


def test_fp32_matches_float64_reference():
    logits, target, grad = _inputs(torch.float32)
    out, g = _value_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=5), logits, target, grad)
    ref_out, ref_g = _value_and_grad(logprobs_reference, logits.double(), target, grad)
    assert out.dtype == torch.float32
    assert max_rel_error(out, ref_out) <= 1e-5
    assert max_rel_error(g, ref_g) <= 1e-5


def test_bf16_within_bf16_rounding():
    logits, target, grad = _inputs(torch.bfloat16)
    out, g = _value_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=7), logits, target, grad)
    # Reference on the same bf16 values in float64: the op accumulates in fp32, so the forward is
    # fp32-exact; the gradient is rounded once to bf16 (relative 2^-8).
    ref_out, ref_g = _value_and_grad(logprobs_reference, logits.double(), target, grad)
    assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert max_rel_error(out, ref_out) <= 1e-5
    assert ((g.double() - ref_g).abs() <= ref_g.abs() * 2**-8 + 1e-30).all()


def test_chunked_equals_unchunked():
    logits, target, grad = _inputs(torch.float32)
    whole = _value_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=10**9), logits, target, grad)
    for chunk in (1, 7, 32):
        chunked = _value_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=chunk), logits, target, grad)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient(dtype):
    logits, target, grad = _inputs(dtype)
    expected = _value_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=5), logits, target, grad)[1]
    x = logits.clone().requires_grad_(True)
    storage = x * 1  # a non-leaf, as the output layer's activations are
    out = vocab_parallel_logprobs(storage, target, chunk_size=5, inplace_backward=True)
    (out.double() * grad).sum().backward()
    assert torch.equal(x.grad, expected)


def test_ignored_targets_give_zero_and_no_gradient():
    logits, target, grad = _inputs(torch.float32)
    target[3:6] = -100
    out, g = _value_and_grad(lambda x, t: vocab_parallel_logprobs(x, t), logits, target, grad)
    assert (out[3:6] == 0).all() and (g[3:6] == 0).all()
    ref_out = logprobs_reference(logits, target.clamp(min=0))
    assert max_rel_error(out[6:], ref_out[6:]) <= 1e-5


def test_gradcheck_float64():
    logits, target, _ = _inputs(torch.float64, s=4, b=2, v=11)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_logprobs(z, target, chunk_size=3), (x,))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="leading shapes"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 5), torch.zeros(3, 2, dtype=torch.long))


def test_kl_matches_reference_and_gradcheck():
    ref_logits, _, grad = _inputs(torch.float32, seed=1)
    pol_logits, _, _ = _inputs(torch.float32, seed=2)
    x = pol_logits.clone().requires_grad_(True)
    out = vocab_parallel_kl(ref_logits, x, chunk_size=6)
    (out.double() * grad).sum().backward()
    y = pol_logits.double().requires_grad_(True)
    expected = kl_reference(ref_logits, y)
    (expected * grad).sum().backward()
    assert max_rel_error(out, expected) <= 1e-5
    assert max_rel_error(x.grad, y.grad) <= 1e-5

    small_ref, _, _ = _inputs(torch.float64, s=3, b=2, v=9, seed=3)
    small_pol = _inputs(torch.float64, s=3, b=2, v=9, seed=4)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_kl(small_ref, z, chunk_size=2), (small_pol,))


@pytest.mark.parametrize("inplace", [False, True])
def test_padded_vocabulary_columns_are_left_out(inplace):
    logits, target, grad = _inputs(torch.float32, v=301)
    padded = torch.cat([logits, torch.randn(*logits.shape[:-1], 83) * 5], dim=-1)
    x = padded.clone().requires_grad_(True)
    out = vocab_parallel_logprobs(x * 1, target, chunk_size=4, vocab_size=301, inplace_backward=inplace)
    (out.double() * grad).sum().backward()
    ref_out, ref_g = _value_and_grad(logprobs_reference, logits.double(), target, grad)
    assert max_rel_error(out, ref_out) <= 1e-5
    assert max_rel_error(x.grad[..., :301], ref_g) <= 1e-5
    assert (x.grad[..., 301:] == 0).all()


def test_kl_leaves_padded_vocabulary_columns_out():
    ref_logits, _, grad = _inputs(torch.float32, v=301, seed=5)
    pol_logits, _, _ = _inputs(torch.float32, v=301, seed=6)
    pad = torch.randn(*pol_logits.shape[:-1], 83) * 5
    x = torch.cat([pol_logits, pad], dim=-1).requires_grad_(True)
    out = vocab_parallel_kl(torch.cat([ref_logits, pad * 2], dim=-1), x, chunk_size=4, vocab_size=301)
    (out.double() * grad).sum().backward()
    y = pol_logits.double().requires_grad_(True)
    expected = kl_reference(ref_logits, y)
    (expected * grad).sum().backward()
    assert max_rel_error(out, expected) <= 1e-5
    assert max_rel_error(x.grad[..., :301], y.grad) <= 1e-5
    assert (x.grad[..., 301:] == 0).all()
