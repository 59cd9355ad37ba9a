"""Where a trainer step's time goes, on the ``vs_trl.py`` workload (TP=1, one process, 2 threads).

Two parts, both in this run:

1. Ablation: the same steps with the trainer's speed-ups switched off one at a time (each variant in
   its own subprocess, ``_ours_side.py``): padding to ``--seq-length`` and full logits (the trainer
   before this change), ``--variable-seq-lengths`` alone, megatron-core's unfused attention
   (``--local-attention megatron``), all on (the default). Seconds per step over
   the steps after ``--warmup``.
2. ``torch.profiler`` over one step of the default configuration: self CPU time grouped by what it
   belongs to (output layer and log-probs, attention, other matmuls, optimizer, ...), and the top ops.

    python bench/profile_step.py [--work-dir DIR] [--steps 5] [--warmup 2]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _dpo_workload import REPO, Workload, build
from _util import machine, print_result

VARIANTS = {
    "fixed_padding_full_logits": ["--no-variable-seq-lengths", "--no-response-logits-only"],
    "variable_padding_full_logits": ["--no-response-logits-only"],
    "megatron_attention": ["--local-attention", "megatron"],
    "variable_padding_response_logits": [],
}
# Op name -> group; the first matching substring wins.
GROUPS = [
    ("_VocabParallelLogProbs", "log-probs op"),
    ("scaled_dot_product", "attention (SDPA)"),
    ("bmm", "attention (bmm, softmax)"),
    ("softmax", "attention (bmm, softmax)"),
    ("adam", "optimizer"),
    ("_foreach", "optimizer"),
    ("mm", "linear layers (mm)"),
    ("addmm", "linear layers (mm)"),
    ("rms", "norms"),
    ("pow", "norms"),
    ("silu", "activations"),
    ("aten::cos", "rotary (cos, sin)"),
    ("aten::sin", "rotary (cos, sin)"),
    ("mul", "elementwise"),
    ("add", "elementwise"),
    ("copy", "copies"),
    ("index", "indexing"),
]


def ablation(work_dir: Path, steps: int, warmup: int, threads: int) -> dict:
    out = {}
    for name, flags in VARIANTS.items():
        result_file = work_dir / f"profile_{name}.json"
        cmd = [sys.executable, str(Path(__file__).parent / "_ours_side.py"), "--work-dir", str(work_dir),
               "--ref-mode", "replica", "--out", str(result_file), "--threads", str(threads), "--steps", str(steps),
               "--extra", *flags]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        r = json.loads(result_file.read_text())
        ends = r["step_ends_s"]
        per_step = (ends[-1] - ends[warmup - 1]) / (steps - warmup)
        out[name] = {"seconds_per_step": round(per_step, 3), "peak_rss_gb": round(r["peak_rss_bytes"] / 1e9, 3)}
        print(name, out[name], flush=True)
    base = out["fixed_padding_full_logits"]["seconds_per_step"]
    for v in out.values():
        v["speedup_vs_fixed_full"] = round(base / v["seconds_per_step"], 2)
    return out


def profile_one_step(work_dir: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from _ours_side import single_process_env, trainer_flags

    single_process_env()

    from sampo_megatron.config import parse_config
    from sampo_megatron.plan import resolve
    from sampo_megatron.training.trainer import Trainer

    paths = json.loads((work_dir / "paths.json").read_text())
    work = json.loads((work_dir / "workload.json").read_text())
    trainer = Trainer(resolve(parse_config(trainer_flags(paths, work, "replica", 3, 1, 4))))
    trainer.train_step(0)
    trainer.train_step(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(2)
    trainer.close()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        group = next((g for key, g in GROUPS if key.lower() in name), "other")
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    print(events.table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    return {
        "step_seconds_profiled": round(total / 1e6, 3),
        "self_cpu_share_by_group": {g: round(t / total, 3) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ablation", action="store_true")
    args = parser.parse_args()
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="profile_step_")
    work_dir = Path(args.work_dir or tmp.name)
    paths = build(Workload(), work_dir)
    (work_dir / "paths.json").write_text(json.dumps(paths))
    result = {"bench": "profile_step", "machine": machine()}
    if not args.skip_ablation:
        result["ablation"] = ablation(work_dir, args.steps, args.warmup, args.threads)
    result["profile"] = profile_one_step(work_dir, args.threads)
    print_result(result)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
