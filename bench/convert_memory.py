"""Peak memory of the checkpoint converters on a synthetic checkpoint of >= 2 GB.

Writes a Llama-style Hugging Face checkpoint (bf16, GQA, sharded safetensors, random weights) of
``--target-gb`` or more, converts it to a torch_dist checkpoint (``tools/convert_hf_to_megatron.py``
logic) and back (``convert_megatron_to_hf``), each in a fresh process. The peak resident set of each
conversion is that process's ``VmHWM`` read when it finishes (everything it ever had resident,
interpreter and libraries included), compared with the checkpoint's size; the target is <= 0.3.
(``ru_maxrss`` from ``wait4`` is not used: Linux carries the parent's resident size into a child's
``maxrss`` at exec, so it reports the parent's size whenever that is larger.) A few exported tensors
are compared bitwise with the source as a sanity check. The last line is one JSON object.

    python bench/convert_memory.py [--target-gb 2.0] [--work-dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _util import machine, print_result, status_kib

TARGET_RATIO = 0.3
# Llama-like shapes; the layer count is chosen to reach the target size.
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2048, 16, 8, 5632, 32000


def _layer_params() -> int:
    head_dim = HIDDEN // HEADS
    attention = HIDDEN * HEADS * head_dim * 2 + HIDDEN * KV_HEADS * head_dim * 2
    return attention + 3 * HIDDEN * FFN + 2 * HIDDEN


def _config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_synthetic(path: str, target_bytes: int) -> int:
    """A sharded bf16 Llama checkpoint of at least ``target_bytes``; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    embed_bytes = 2 * VOCAB * HIDDEN * 2 + HIDDEN * 2
    layers = max(2, -(-(target_bytes - embed_bytes) // (_layer_params() * 2)))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config(layers), f, indent=2)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    head_dim = HIDDEN // HEADS
    groups = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append([
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * head_dim, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * head_dim)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, FFN)),
        ])  # fmt: skip
    groups.append([("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))])
    # Two layers per file, like a real sharded checkpoint (the writer holds one file's tensors).
    files = [sum(groups[i : i + 2], []) for i in range(0, len(groups), 2)]
    weight_map, total = {}, 0
    for n, entries in enumerate(files):
        name = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = {key: rand(*shape) for key, shape in entries}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({key: name for key in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _child(direction: str, src: str, dst: str) -> None:
    """Runs one conversion; prints the RSS after imports (the interpreter + torch floor) and the
    process's peak RSS (VmHWM) at the end."""
    import torch  # noqa: F401

    from sampo_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from sampo_megatron.convert.memory import return_freed_memory_to_os

    return_freed_memory_to_os()  # as the command-line tools do
    baseline = status_kib("VmRSS") * 1024
    emit = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if direction == "hf_to_megatron":
        convert_hf_to_megatron(src, dst, tensor_model_parallel_size=2, emit=emit)
    else:
        convert_megatron_to_hf(src, dst, max_shard_bytes=10**9, emit=emit)
    print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": status_kib("VmHWM") * 1024}), flush=True)


def measure(direction: str, src: str, dst: str) -> dict:
    """Run one conversion in a fresh process; its peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", direction, src, dst], stdout=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{direction} failed ({proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def _same_tensors(src: str, dst: str, names: list[str]) -> bool:
    from safetensors import safe_open

    def load(path: str, name: str):
        index = os.path.join(path, "model.safetensors.index.json")
        file = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
        with safe_open(os.path.join(path, file), "pt") as f:
            return f.get_tensor(name)

    return all(load(src, n).equal(load(dst, n)) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-gb", type=float, default=2.0, help="minimum checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--work-dir", default=None, help="where to put the three checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    work = tempfile.mkdtemp(prefix="convert_memory_", dir=args.work_dir)
    try:
        hf, mg, back = (os.path.join(work, n) for n in ("hf", "megatron", "hf_back"))
        start = time.perf_counter()
        size = write_synthetic(hf, int(args.target_gb * 1e9))
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for direction, src, dst in (("hf_to_megatron", hf, mg), ("megatron_to_hf", mg, back)):
            r = measure(direction, src, dst)
            r["ratio"] = round(r["peak_rss_bytes"] / size, 4)
            results[direction] = r
            print(f"{direction}: peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB (after imports {r['baseline_rss_bytes'] / 1e9:.3f} GB), "
                  f"{r['ratio']:.3f} x checkpoint, {r['seconds']} s", flush=True)  # fmt: skip
        layers = json.load(open(os.path.join(hf, "config.json")))["num_hidden_layers"]
        checked = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                   f"model.layers.{layers - 1}.self_attn.v_proj.weight", "lm_head.weight"]  # fmt: skip
        ratio = max(r["ratio"] for r in results.values())
        print_result({
            "benchmark": "convert_memory",
            "checkpoint_bytes": size,
            "layers": layers,
            **results,
            "peak_rss_over_checkpoint_size": ratio,
            "target": TARGET_RATIO,
            "met": ratio <= TARGET_RATIO,
            "round_trip_tensors_equal": _same_tensors(hf, back, checked),
            "machine": machine(),
        })  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
