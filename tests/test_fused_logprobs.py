"""The fused, chunked output layer + log-prob op (sampo_megatron/ops/fused_logprobs.py) against
autograd through ``log_softmax`` in float64, alone and with the vocabulary split over 2 ranks."""

from __future__ import annotations

import pytest
import torch
from fused_logprobs_worker import problem  # tests/workers is on pytest's pythonpath (pyproject.toml)

from sampo_megatron.ops import vocab_parallel_logprobs
from sampo_megatron.ops.fused_logprobs import fused_linear_logprobs

from helpers import BASE, assert_same_steps, train
from pool import pool


def reference(hidden, weight, target, vocab):
    """log softmax over the real vocabulary (rows of ``weight`` past ``vocab`` are padding), 0 at ignored targets."""
    logits = hidden @ weight[:vocab].t()
    picked = logits.log_softmax(-1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(target >= 0, picked, 0.0)


@pytest.mark.parametrize("positions", [12, 50], ids=["vocab-chunked-backward", "position-chunked-backward"])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 100])
def test_log_probs_and_gradients_equal_autograd_through_log_softmax(chunk_size, positions):
    """Backward accumulates the smaller gradient: dL/dx over vocabulary chunks when the positions
    are fewer than the vocabulary rows (12 < 37), dL/dW over position chunks otherwise (50 > 37)."""
    hidden, weight, target, grad, vocab = problem(seed=1, n=positions)
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = fused_linear_logprobs(x, w, target, vocab_size=vocab, chunk_size=chunk_size)
    ours.backward(grad)
    x_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = reference(x_ref, w_ref, target, vocab)
    expected.backward(grad)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(w.grad[vocab:] == 0) and torch.all(x.grad[target < 0] == 0)  # padding rows, ignored positions


def test_gradcheck_in_float64():
    hidden, weight, target, _, vocab = problem(seed=2, n=6, h=4, vocab=9, padded=12)
    x, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fused_linear_logprobs(a, b, target, vocab_size=vocab, chunk_size=4), (x, w))


def test_equals_the_logits_op_in_the_model_dtype():
    """In bf16 the logits are the output layer's (a bf16 matmul), reduced in fp32: the same values
    as today's op on the output layer's bf16 logits."""
    hidden, weight, target, _, vocab = problem(seed=3, n=64, h=32, vocab=500, padded=512)
    x, w = hidden.bfloat16(), weight.bfloat16()
    ours = fused_linear_logprobs(x, w, target, vocab_size=vocab, chunk_size=16)
    today = vocab_parallel_logprobs(x @ w.t(), target, vocab_size=vocab)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, today, rtol=0, atol=1e-5)


def test_leading_shapes_and_bad_shapes():
    hidden, weight, target, _, vocab = problem(seed=4)
    flat = fused_linear_logprobs(hidden, weight, target, vocab_size=vocab)
    shaped = fused_linear_logprobs(hidden.view(3, 4, -1), weight, target.view(3, 4), vocab_size=vocab)
    assert torch.equal(shaped.reshape(-1), flat)
    with pytest.raises(ValueError, match="leading shapes differ"):
        fused_linear_logprobs(hidden, weight, target[:-1])
    with pytest.raises(ValueError, match=r"is not \[V/TP, 8\]"):
        fused_linear_logprobs(hidden, weight[:, :-1], target)


@pytest.mark.multiprocess
@pytest.mark.parametrize("chunk_size,positions", [(None, 12), (3, 50)])
def test_the_vocabulary_split_over_two_ranks_equals_one_process(chunk_size, positions):
    hidden, weight, target, grad, vocab = problem(seed=5, n=positions)
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = reference(x, w, target, vocab)
    expected.backward(grad)
    results, output = pool(2).run("fused_logprobs_worker:vocab_split", 5, chunk_size, positions, timeout=120)
    rows = weight.shape[0] // 2
    for rank, result in enumerate(results):
        got = {name: torch.tensor(values, dtype=torch.float64) for name, values in result.items()}
        torch.testing.assert_close(got["logps"], expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad_hidden"], x.grad, rtol=1e-12, atol=1e-12)  # summed over the ranks
        torch.testing.assert_close(got["grad_weight"], w.grad[rank * rows : (rank + 1) * rows], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- in training
def test_fused_logprobs_flags_are_checked():
    from sampo_megatron.config import parse_config
    from sampo_megatron.validation import config_problems

    def problems(*flags):
        return "\n".join(config_problems(parse_config(["--fused-logprobs", *flags]), world_size=1, purpose="dry_run"))

    assert "drop --no-response-logits-only" in problems("--no-response-logits-only")
    assert "--loss-type tdpo2's per-token KL" in problems("--loss-type", "tdpo2")
    assert "--fused-logprobs-chunk-size must be >= 1" in problems("--fused-logprobs-chunk-size", "0")
    assert problems() == ""


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="sampo-tp2"),
        pytest.param(["--loss-type", "sigmoid", "--length-debias", "none", "--ref-mode", "cache", "--sequence-parallel"], id="dpo-cache-sp"),
        pytest.param(["--pack-sequences", "--fused-logprobs-chunk-size", "7"], id="sampo-packed"),
    ],
)
def test_a_run_with_fused_logprobs_equals_the_run_with_logits(tmp_path, flags):
    save = "--ref-mode" in flags  # the cache lives under --save
    with_logits, _ = train(tmp_path, "logits", 2, *flags, save=save)
    fused, _ = train(tmp_path, "fused", 2, *flags, "--fused-logprobs", save=save)
    assert len(fused) == 3 and fused[-1]["rewards/margins"] != 0.0
    assert_same_steps(fused, with_logits, rel=1e-5)


@pytest.mark.multiprocess
def test_the_fused_run_never_computes_logits(tmp_path):
    """The chunk returns the final hidden states at the response positions (width h), which the loss
    projects itself: there is no [n, V/TP] tensor to fall back on."""
    flags = [*BASE, "--save", "", "--metrics-file", "", "--fused-logprobs"]
    results, output = pool(2).run("fused_logprobs_worker:chunk_output_width", flags, timeout=300)
    for got in results:
        assert got["compact"] is True, output
        assert got["shape"] == [1, got["responses"], got["hidden"]], got
