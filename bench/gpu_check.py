"""One-GPU check (run by bench/gpu_check.sh): BF16 step time and MFU of policy + reference for the
largest Llama-shaped model the memory planner says fits this GPU, the planner's prediction against
the measured peak, the vocab-parallel log-prob op against a plain log_softmax + gather, and FP8
against BF16 when Transformer Engine imports.

    python bench/gpu_check.py                # on the GPU (bench/gpu_check.sh sets it up)
    python bench/gpu_check.py --cpu-smoke    # the same code on a tiny fp32 model on CPU

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
import torch.distributed as dist

from sampo_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig, TrainingConfig
from sampo_megatron.planning import GIB, Layout, ModelShape, plan_memory
from sampo_megatron.planning.shapes import attention_kind

# Llama-3 family shapes, largest first (Llama-3-8B, Llama-3.2-3B, Llama-3.2-1B).
CANDIDATES = {
    "llama3-8b": ModelShape(32, 4096, 14336, 32, 8, 128256),
    "llama3.2-3b": ModelShape(28, 3072, 8192, 24, 8, 128256),
    "llama3.2-1b": ModelShape(16, 2048, 8192, 32, 8, 128256),
}
SMOKE = {"tiny": ModelShape(2, 128, 352, 4, 2, 1024, make_vocab_size_divisible_by=64)}
# Every step recomputes every layer (full, uniform, 1 layer per chunk): the largest model fits.
RECOMPUTE = RecomputeConfig(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
# Dense BF16 peak (no sparsity) from NVIDIA's data sheets.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12}


def peak_flops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def step_flops(shape: ModelShape, tokens: int, seq: int) -> float:
    """Model FLOPs of one policy forward + backward and one reference forward (recomputation not
    counted): ``(6 + 2) (N T + h V T) + (12 + 4) L h s T / 2`` with ``N`` the layers' parameters,
    ``T`` tokens, causal attention counted as half of the full ``s x s`` product."""
    from sampo_megatron.planning.memory import layer_params

    dense = shape.num_layers * layer_params(shape, 1) * tokens + shape.hidden_size * shape.vocab_size * tokens
    attention = shape.num_layers * shape.hidden_size * seq * tokens / 2
    return 8 * dense + 16 * attention


def model_config(shape: ModelShape, impl: str) -> ModelConfig:
    return ModelConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        vocab_size=shape.vocab_size, make_vocab_size_divisible_by=shape.make_vocab_size_divisible_by,
        rotary_base=500000, transformer_impl=impl,
    )  # fmt: skip


def init_single_process(device: torch.device) -> None:
    """The trainer's set-up (sampo_megatron/runtime/distributed.py) for one process."""
    from sampo_megatron.runtime.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(ParallelConfig(), seed=1234)


class PolicyAndReference:
    """A policy (megatron DDP + optimizer) and a frozen reference of the same shape, one SamPO step,
    built with the trainer's builders (sampo_megatron/runtime/builders.py)."""

    def __init__(self, shape: ModelShape, precision: PrecisionConfig, impl: str, seq: int, device: torch.device):
        from sampo_megatron.config import RunConfig
        from sampo_megatron.plan import resolve
        from sampo_megatron.runtime.builders import build_chunks, build_optimizer, run_transformer_config, wrap_ddp

        # the trainer's plan for a model of this shape on this GPU (nothing read: purpose "model")
        cfg = RunConfig(model=model_config(shape, impl), training=TrainingConfig(seq_length=seq), precision=precision, recompute=RECOMPUTE)
        plan = resolve(cfg, world_size=1, purpose="model")
        cfg = plan.config
        self.config = run_transformer_config(plan)
        self.policy = wrap_ddp(cfg, self.config, build_chunks(plan, self.config))[0]
        self.reference = build_chunks(plan, frozen=True)[0]
        # the reference starts as a copy of the policy (as in training): the first loss is log 2
        from sampo_megatron.training.reference import copy_weights

        copy_weights([self.policy], [self.reference])
        self.optimizer = build_optimizer(cfg, self.config, [self.policy])
        self.vocab = shape.vocab_size
        # One pair: chosen row, rejected row; the second half of each row is the response.
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, shape.vocab_size, (2, seq), generator=g).to(device)
        self.labels = torch.roll(self.tokens, -1, dims=1)
        self.positions = torch.arange(seq, device=device).expand(2, seq)
        self.mask = torch.zeros(2, seq, dtype=torch.bool, device=device)
        self.mask[:, seq // 2 : -1] = True
        self.mask[1, seq - seq // 4 :] = False  # rejected shorter: SamPO down-samples the chosen
        self.sample_ids = torch.tensor([0], device=device)

    def _logps(self, logits):
        from sampo_megatron.ops import vocab_parallel_logprobs

        return vocab_parallel_logprobs(logits, self.labels, None, inplace_backward=True, vocab_size=self.vocab)

    def step(self) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss

        with torch.no_grad():
            ref_logps = self._logps(self.reference(self.tokens, self.positions, None))

        def forward_step(data_iterator, model):
            next(data_iterator)

            def loss_func(logits):
                out = preference_loss(
                    PreferenceInputs(self._logps(logits), self.mask, self.sample_ids, ref_logps),
                    LossConfig(loss_type="sigmoid", length_debias="sampo", beta=0.1),
                )
                loss = out.losses.sum()
                return loss, {"loss": loss.detach()}

            return model(self.tokens, self.positions, None), loss_func

        self.policy.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([0]), model=[self.policy], num_microbatches=1,
            seq_length=self.tokens.shape[1], micro_batch_size=2, forward_only=False,
        )  # fmt: skip
        self.optimizer.step()
        return float(out[0]["loss"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(runner: PolicyAndReference, warmup: int, steps: int, device) -> tuple[list[float], float]:
    """Step times after ``warmup`` steps, and the first step's loss (log 2: policy == reference)."""
    first = runner.step()
    for _ in range(warmup - 1):
        runner.step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        runner.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, first


def logprob_op(seq: int, vocab: int, dtype, device, repeats: int) -> dict:
    """Forward + backward of the log-prob op on ``[2, seq, vocab]`` logits against
    ``log_softmax(fp32) + gather`` on the same logits, with each one's peak extra memory."""
    from sampo_megatron.ops import vocab_parallel_logprobs

    labels = torch.randint(0, vocab, (2, seq), device=device)

    def ours(z):
        return vocab_parallel_logprobs(z, labels, None, inplace_backward=True)

    def baseline(z):
        return torch.log_softmax(z.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    result = {}
    for name, fn in (("ours", ours), ("log_softmax_gather", baseline)):
        times, peaks = [], []
        for i in range(repeats + 1):
            logits = torch.randn(2, seq, vocab, device=device, dtype=dtype)
            leaf = logits.clone().requires_grad_()
            z = leaf * 1.0  # a non-leaf, as the output layer's logits are
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn(z).sum().backward()
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks.append((torch.cuda.max_memory_allocated() - base) / GIB)
            del logits, leaf, z
        result[name] = {"median_s": statistics.median(times), "peak_extra_gib": max(peaks) if peaks else None}
    result["speedup"] = result["log_softmax_gather"]["median_s"] / result["ours"]["median_s"]
    return result


def pick_shape(candidates: dict, layout: Layout, gpu_bytes: float) -> tuple[str, ModelShape, object]:
    for name, shape in candidates.items():
        plan = plan_memory(shape, layout)
        if plan.fits(gpu_bytes):
            return name, shape, plan
    raise SystemExit(f"no candidate fits {gpu_bytes / GIB:.0f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 model on CPU (checks the code, not the GPU)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA GPU: run with --cpu-smoke to check the code on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    seq = args.seq_length if cuda else 64
    init_single_process(device)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", "torch": torch.__version__}
    try:
        import megatron.core

        report["megatron_core"] = megatron.core.__version__
    except AttributeError:
        pass

    # BF16, local spec (no Transformer Engine needed), full recomputation of every layer.
    layout = Layout(micro_batch_size=1, global_batch_size=1, seq_length=seq, param_bytes=2 if cuda else 4,
                    recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
                    attention=attention_kind("local", "sdpa"))  # fmt: skip
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 64 * GIB
    name, shape, plan = pick_shape(CANDIDATES if cuda else SMOKE, layout, gpu_bytes)
    runner = PolicyAndReference(shape, PrecisionConfig(bf16=cuda), "local", seq, device)
    times, loss = time_steps(runner, args.warmup, args.steps, device)
    step_s = statistics.median(times)
    flops = step_flops(shape, 2 * seq, seq)
    peak = peak_flops(report["device"]) if cuda else None
    report["bf16_policy_reference"] = {
        "model": name, "seq_length": seq, "pairs_per_step": 1, "recompute": "full uniform 1",
        "step_s_median": step_s, "step_s_all": times, "first_step_loss": loss,
        "model_tflops_per_s": flops / step_s / 1e12, "mfu": flops / step_s / peak if peak else None,
        "planner_predicted_gib": plan.total / GIB,
        "measured_peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
    }  # fmt: skip
    del runner
    if cuda:
        torch.cuda.empty_cache()

    report["logprob_op"] = logprob_op(
        seq if cuda else 64, shape.vocab_size, torch.bfloat16 if cuda else torch.float32, device, 5 if cuda else 2
    )
    report["logprob_op"]["shape"] = [2, seq, shape.vocab_size]

    report["fp8_vs_bf16"] = fp8_vs_bf16(shape, seq, device, args) if cuda else {"skipped": "CPU smoke: FP8 needs a GPU"}
    report["packed_vs_alone"] = {impl: packed_vs_alone(impl, device) for impl in ("local", "transformer_engine")}
    print(json.dumps(report), flush=True)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def packed_vs_alone(impl: str, device) -> dict:
    """THD numerics (--pack-sequences): logits of 3 sequences packed in one row (PackedSeqParams)
    against each sequence alone, fp32, a small model; the largest relative difference."""
    if impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as err:
            return {"skipped": f"Transformer Engine is not importable ({err})"}
        if device.type != "cuda":
            return {"skipped": "Transformer Engine needs a GPU"}
    from sampo_megatron.data.packing import packed_seq_params
    from sampo_megatron.models.gpt import build_model_chunks, transformer_config

    model = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=512, transformer_impl=impl)
    config = transformer_config(model)
    (chunk,) = build_model_chunks(model, config, 512, 256)
    chunk.eval()
    lengths = [37, 100, 5]
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 512, (n,), generator=g).to(device) for n in lengths]
    width = 160
    row = torch.zeros(width, dtype=torch.long, device=device)
    positions = torch.zeros(width, dtype=torch.long, device=device)
    starts = [0]
    for seq in sequences:
        row[starts[-1] : starts[-1] + len(seq)] = seq
        positions[starts[-1] : starts[-1] + len(seq)] = torch.arange(len(seq), device=device)
        starts.append(starts[-1] + len(seq))
    cu = torch.tensor([*starts, width], dtype=torch.int32, device=device)
    try:
        with torch.no_grad():
            packed = chunk(row[None], positions[None], None, packed_seq_params=packed_seq_params({"cu_seqlens": cu}))[0]
            worst = 0.0
            for seq, start in zip(sequences, starts):
                alone = chunk(seq[None], torch.arange(len(seq), device=device)[None], None)[0]
                part = packed[start : start + len(seq)]
                worst = max(worst, float((part - alone).abs().max() / alone.abs().max()))
    except Exception as err:  # report, and keep the other results
        return {"error": f"{type(err).__name__}: {err}"[:500]}
    return {"lengths": lengths, "row": width, "max_rel_diff": worst}


def fp8_vs_bf16(shape: ModelShape, seq: int, device, args) -> dict:
    """Step time with Transformer Engine layers in BF16 and in FP8 (hybrid, delayed scaling)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        return {"skipped": f"Transformer Engine is not importable ({err})"}
    out = {"transformer_engine": getattr(transformer_engine, "__version__", "?")}
    base = PrecisionConfig(bf16=True)
    for label, precision in (("bf16_te", base), ("fp8_hybrid", dataclasses.replace(base, fp8_format="hybrid"))):
        try:
            runner = PolicyAndReference(shape, precision, "transformer_engine", seq, device)
            times, loss = time_steps(runner, args.warmup, args.steps, device)
            out[label] = {"step_s_median": statistics.median(times), "first_step_loss": loss}
            del runner
            torch.cuda.empty_cache()
        except Exception as err:  # report, and keep the BF16 results
            out[label] = {"error": f"{type(err).__name__}: {err}"[:500]}
    if "step_s_median" in out.get("bf16_te", {}) and "step_s_median" in out.get("fp8_hybrid", {}):
        out["fp8_speedup"] = out["bf16_te"]["step_s_median"] / out["fp8_hybrid"]["step_s_median"]
    return out


if __name__ == "__main__":
    main()
