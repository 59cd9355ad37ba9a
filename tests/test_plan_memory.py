"""The memory planner (sampo_megatron/planning, tools/plan_memory.py, --dry-run) against measured
peaks, megatron-core's own parameter counts and the published model sizes."""

import json
import math
import subprocess
import sys

import pytest

from sampo_megatron.planning import PRESETS, Layout, LayoutError, ModelShape, check_layout, plan_memory
from sampo_megatron.planning.memory import stage_params

from helpers import REPO_ROOT, run_torchrun, torchrun_env

SHIPPED = REPO_ROOT / "examples" / "data" / "tiny_pairs.jsonl"
TINY = [
    "--tokenizer-model", str(REPO_ROOT / "examples" / "data" / "tiny_tokenizer"), "--make-vocab-size-divisible-by", "64",
    "--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--vocab-size", "8000", "--seq-length", "256", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "2", "--lr", "0.001", "--length-debias", "sampo",
]  # fmt: skip
TINY_SHAPE = ModelShape(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=2,
                        vocab_size=8000, make_vocab_size_divisible_by=64)  # fmt: skip


def repeated_pairs(tmp_path, fields: tuple[str, ...], times: int):
    """The first 16 shipped pairs with ``fields`` repeated ``times`` times."""
    rows = []
    for line in SHIPPED.read_text().splitlines()[:16]:
        record = json.loads(line)
        for name in fields:
            record[name] = (record[name] + " ") * times
        rows.append(json.dumps(record))
    path = tmp_path / f"{'_'.join(fields)}_x{times}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def long_pairs(tmp_path):
    """Pairs whose prompt is longer than --seq-length, so every micro-batch is [2 mbs, seq-length]
    (the planner's shape) whatever the batch padding policy."""
    return repeated_pairs(tmp_path, ("prompt",), 30)


@pytest.mark.multiprocess
def test_predicted_peak_within_15_percent_of_measured(tmp_path):
    """Single process, fp32, local attention; four layouts in one launch: reference replica and
    cache, with and without recomputation. The worker measures the peak of bytes held by torch's CPU
    allocator from right before the Trainer is built to the end of step 2 (torch profiler memory
    events, see tests/workers/memory_worker.py); the planner predicts the same quantity."""
    layouts = {
        "replica": [],
        "cache": ["--ref-mode", "cache", "--ref-cache-dir", str(tmp_path / "cache1")],
        "replica_full_recompute": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
        "cache_selective_recompute": ["--ref-mode", "cache", "--ref-cache-dir", str(tmp_path / "cache2"), "--recompute-granularity", "selective"],
    }  # fmt: skip
    out = tmp_path / "memory.json"
    run_torchrun(
        "memory_worker.py",
        1,
        "--out",
        str(out),
        "--layouts",
        json.dumps(layouts),
        *TINY,
        "--data-path",
        str(long_pairs(tmp_path)),
    )
    results = json.loads(out.read_text())[0]
    for name, r in results.items():
        ratio = r["predicted"] / r["measured"]
        print(f"{name}: measured {r['measured'] / 2**20:.1f} MiB, predicted {r['predicted'] / 2**20:.1f} MiB ({ratio:.3f})")
        assert 0.85 <= ratio <= 1.15, (name, r)
        # megatron-core's GPTModel holds exactly the parameters the planner counts
        assert r["params"] == stage_params(TINY_SHAPE, Layout(param_bytes=4, attention="local"), 0), name
    # the flags reached the policy and the replica (one builder for both)
    assert results["replica_full_recompute"]["policy_configs"][0]["recompute_method"] == "uniform"
    assert results["replica_full_recompute"]["reference_configs"] == results["replica_full_recompute"]["policy_configs"]
    assert results["replica"]["reference_configs"][0]["recompute_granularity"] is None
    # the replica costs one more copy of the weights, recomputation saves activations
    assert results["replica"]["measured"] > results["cache"]["measured"]
    assert results["replica_full_recompute"]["measured"] < results["replica"]["measured"]


def long_responses(tmp_path):
    """Pairs whose responses fill --seq-length, so nearly every position is a response position
    (the planner counts TDPO's kept hidden states and reference logits at every position)."""
    return repeated_pairs(tmp_path, ("chosen", "rejected"), 40)


@pytest.mark.multiprocess
def test_tdpo_predicted_peak_within_15_percent_of_measured(tmp_path):
    """TDPO's extra memory (the replica's kept hidden states, the recomputed reference logits and the
    logits' gradient) measured as above, against DPO on the same data."""
    out = tmp_path / "memory.json"
    layouts = {"replica": [], "replica_tdpo": ["--loss-type", "tdpo2", "--length-debias", "none"]}
    run_torchrun("memory_worker.py", 1, "--out", str(out), "--layouts", json.dumps(layouts), *TINY,
                 "--data-path", str(long_responses(tmp_path)))  # fmt: skip
    results = json.loads(out.read_text())[0]
    for name, r in results.items():
        ratio = r["predicted"] / r["measured"]
        print(f"{name}: measured {r['measured'] / 2**20:.1f} MiB, predicted {r['predicted'] / 2**20:.1f} MiB ({ratio:.3f})")
        assert 0.85 <= ratio <= 1.15, (name, r)
    extra_measured = results["replica_tdpo"]["measured"] - results["replica"]["measured"]
    extra_predicted = results["replica_tdpo"]["predicted"] - results["replica"]["predicted"]
    print(f"TDPO extra: measured {extra_measured / 2**20:.1f} MiB, predicted {extra_predicted / 2**20:.1f} MiB")
    assert extra_measured > 0 and 0.5 <= extra_predicted / extra_measured <= 1.5


@pytest.mark.parametrize(
    "name, billions",
    [("pythia-2.8b", 2.775), ("llama3-8b", 8.030), ("tulu2-13b", 13.016), ("qwen1.5-72b", 72.288)],
)
def test_presets_have_the_published_parameter_counts(name, billions):
    """Model cards: Pythia-2.8B 2,775,208,960; Llama-3-8B 8,030,261,248; Llama-2-13B 13,015,864,320;
    Qwen1.5-72B 72,287,920,128 (safetensors index totals / 2 bytes)."""
    shape = PRESETS[name]
    # unpadded vocabulary: divisible_by 1 keeps the Hugging Face row count
    from dataclasses import replace

    total = stage_params(replace(shape, make_vocab_size_divisible_by=1), Layout(), 0)
    assert total / 1e9 == pytest.approx(billions, rel=2e-3)


def test_layout_errors_name_every_problem():
    bad = Layout(tp=3, pp=3, global_batch_size=10, micro_batch_size=4, dp=2, sequence_parallel=True, seq_length=1000)
    with pytest.raises(LayoutError) as err:
        check_layout(PRESETS["llama3-8b"], bad, world_size=20)
    message = str(err.value)
    for expected in ("attention heads (32) not divisible by --tensor-model-parallel-size 3", "query groups (8)",
                     "layers (32) not divisible by --pipeline-model-parallel-size 3", "--global-batch-size 10",
                     "--seq-length 1000 not divisible", "20 GPUs"):  # fmt: skip
        assert expected in message


def test_memory_parts_scale_with_the_layout():
    shape = PRESETS["llama3-8b"]
    base = Layout(tp=1, pp=1, dp=8, micro_batch_size=1, global_batch_size=64, seq_length=8192)
    plan = plan_memory(shape, base)
    from dataclasses import replace

    # Adam moments + fp32 master weights = 12 bytes per parameter, weights 2, fp32 gradients 4
    assert plan.parts["optimizer"] == 6 * plan.parts["weights"]
    assert plan.parts["gradients"] == 2 * plan.parts["weights"]
    assert plan_memory(shape, replace(base, distributed_optimizer=True)).parts["optimizer"] == plan.parts["optimizer"] // 8
    assert plan_memory(shape, replace(base, ref_mode="cache")).parts["reference"] == 0
    tp2 = plan_memory(shape, replace(base, tp=2, dp=4))
    assert tp2.parts["weights"] == pytest.approx(plan.parts["weights"] / 2, rel=1e-3)
    full = plan_memory(shape, replace(base, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    assert full.parts["activations"] < plan.parts["activations"] / 5


def run_cli(*args):
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO_ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.multiprocess
def test_fused_logprobs_plan_holds_no_logits():
    """--fused-logprobs: two fp32 chunks and the smaller fp32 gradient sum instead of [T, V/TP] logits."""
    from sampo_megatron.config import parse_config
    from sampo_megatron.planning.dry_run import layout_from_config
    from sampo_megatron.planning.memory import _LOGPROB_CHUNK_BYTES, logits_bytes

    shape = PRESETS["llama3-8b"]
    base = Layout(tp=2, seq_length=8192, param_bytes=2)
    fused = Layout(tp=2, seq_length=8192, param_bytes=2, fused_logprobs=True)
    tokens, vocab_local = 2 * 8192, 128256 // 2
    inputs = 2 * tokens * shape.hidden_size * 2
    chunk = max(1, min(_LOGPROB_CHUNK_BYTES // (4 * vocab_local), -(-tokens // 8)))
    assert logits_bytes(shape, base) == tokens * vocab_local * 2 + chunk * vocab_local * 4 + inputs
    assert logits_bytes(shape, fused) == 2 * chunk * vocab_local * 4 + tokens * shape.hidden_size * 4 + inputs
    assert logits_bytes(shape, fused) < logits_bytes(shape, base) / 3
    assert layout_from_config(parse_config(["--fused-logprobs"]), 1).fused_logprobs
    assert "fused-logprobs" in fused.describe()


def test_plan_memory_tool_and_dry_run_of_the_72b_recipe():
    tool = run_cli("tools/plan_memory.py", "--model", "qwen1.5-72b", "--tensor-model-parallel-size", "8",
                   "--pipeline-model-parallel-size", "4", "--world-size", "64", "--seq-length", "2048", "--bf16",
                   "--fp8-format", "hybrid", "--sequence-parallel", "--use-distributed-optimizer", "--gpu-memory-gib", "80")  # fmt: skip
    assert tool.returncode == 0, tool.stderr
    assert "fits a 80 GiB GPU" in tool.stdout and "activations" in tool.stdout
    search = run_cli(
        "tools/plan_memory.py", "--model", "llama3-8b", "--search", "--world-size", "8", "--seq-length", "8192", "--bf16"
    )
    assert search.returncode == 0, search.stderr
    assert "TP" in search.stdout

    recipe = REPO_ROOT / "examples" / "recipes" / "qwen1.5-72b_ultrafeedback_fp8.yaml"
    ok = run_cli("launch/pretrain_sampo.py", "--config", recipe, "--dry-run", "--world-size", "64")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "fits a 80 GiB GPU" in ok.stdout, ok.stdout
    bad = run_cli("launch/pretrain_sampo.py", "--config", recipe, "--dry-run", "--world-size", "60",
                  "--tensor-model-parallel-size", "6")  # fmt: skip
    assert bad.returncode != 0
    assert "not divisible by --tensor-model-parallel-size 6" in bad.stderr and "60 GPUs" in bad.stderr


@pytest.mark.multiprocess
def test_gpu_check_runs_its_code_on_cpu():
    """bench/gpu_check.py's --cpu-smoke: the same model building, SamPO step, timing and log-prob
    comparison on a tiny fp32 model (the GPU numbers need the GPU: docs/benchmarks.md)."""
    proc = run_cli("bench/gpu_check.py", "--cpu-smoke", "--warmup", "1", "--steps", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    step = report["bf16_policy_reference"]
    assert step["model"] == "tiny" and step["step_s_median"] > 0 and step["first_step_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert report["logprob_op"]["ours"]["median_s"] > 0 and "skipped" in report["fp8_vs_bf16"]
    # THD packing: the local spec's packed logits equal each sequence alone (TE's needs the GPU)
    assert report["packed_vs_alone"]["local"]["max_rel_diff"] < 1e-5, report["packed_vs_alone"]
    assert "skipped" in report["packed_vs_alone"]["transformer_engine"]
