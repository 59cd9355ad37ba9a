"""Packed against unpacked training on a length-skewed workload, side by side in rounds.

The workload (``_dpo_workload.py``, generated locally and seeded): the ``vs_trl.py`` model (a
random-init Llama, 4 layers, hidden 256, 8 heads, 4 KV heads, vocabulary 8000, fp32), 48 pairs
with 64-token prompts and long-tailed response lengths (lognormal, median 150 tokens, sigma 1,
clipped to 20-1500), ``--seq-length 2048``. Training: SamPO (sigmoid DPO, ``--length-debias
sampo``) with the reference replica, 2 pairs per micro-batch, 8 pairs per step, 1 warm-up step and
5 timed steps, 2 threads. The unpacked side (``--no-pack-sequences``) pads each micro-batch to its
longest sequence (``--variable-seq-lengths``); the packed side has ``--pack-sequences``.

The two sides alternate (unpacked, packed, unpacked, ...; ``--rounds``, default 3, each side in
its own subprocess) and the ratio is each round's packed over unpacked pairs/s; the result reports
the median and its spread. Before the timings count, the run checks that both sides computed the
same losses at every step (rel 1e-5): packing changes the work, not the numbers.

    python bench/packing.py [--work-dir DIR] [--rounds 3] [--threads 2]

The last line is one JSON object: ``ratio_pairs_per_s`` (median), its spread, each side's pairs/s
per round and both padding fractions (the share of computed positions that are padding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from _dpo_workload import REPO, Workload, build
from _util import in_rounds, machine, print_result, ratio_summary

WORKLOAD = Workload(
    pairs=48, min_response=20, max_response=1500, max_length=2048, length_distribution="lognormal", lognormal_median=150
)
MICRO_BATCH, GLOBAL_BATCH = 2, 8
WARMUP_STEPS, TIMED_STEPS = 1, 5
LOSS_RTOL = 1e-5
SIDES = {"unpacked": ["--no-pack-sequences"], "packed": ["--pack-sequences"]}


def run_ours(work_dir: Path, name: str, flags: list[str], out: Path, threads: int) -> dict:
    steps = WARMUP_STEPS + TIMED_STEPS
    cmd = [sys.executable, str(Path(__file__).parent / "_ours_side.py"), "--work-dir", str(work_dir), "--ref-mode", "replica",
           "--out", str(out), "--threads", str(threads), "--steps", str(steps), "--micro-batch", str(MICRO_BATCH),
           "--global-batch", str(GLOBAL_BATCH), "--extra", "--length-debias", "sampo", *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return json.loads(out.read_text())


def timed(side: dict) -> dict:
    """Pairs/s over the timed steps, and the padding over all steps."""
    ends = side["step_ends_s"]
    seconds = ends[WARMUP_STEPS + TIMED_STEPS - 1] - ends[WARMUP_STEPS - 1]
    steps = side["steps"]
    return {
        "pairs_per_s": round(TIMED_STEPS * GLOBAL_BATCH / seconds, 3),
        "padding_fraction": round(sum(s["padding_fraction"] for s in steps) / len(steps), 4),
        "sequences_per_row": round(sum(s["pack/sequences_per_row"] for s in steps) / len(steps), 2),
        "peak_rss_gb": round(side["peak_rss_bytes"] / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="where the workload is generated (reused if present); default: a temporary directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if WORKLOAD.pairs != (WARMUP_STEPS + TIMED_STEPS) * GLOBAL_BATCH:
        raise ValueError("the workload's pairs must fill the steps exactly (one epoch)")
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="packing_")
    work_dir = Path(args.work_dir or tmp.name)
    print(f"building the workload in {work_dir} ...", flush=True)
    paths = build(WORKLOAD, work_dir)
    (work_dir / "paths.json").write_text(json.dumps(paths))

    runs = in_rounds(
        {name: (lambda r, name=name, flags=flags: run_ours(work_dir, name, flags, work_dir / f"{name}_{r}.json", args.threads))
         for name, flags in SIDES.items()},
        args.rounds,
    )  # fmt: skip
    losses = {name: [s["loss"] for s in runs[name][0]["steps"]] for name in SIDES}
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["packed"], losses["unpacked"]))
    same = worst <= LOSS_RTOL and len(losses["packed"]) == len(losses["unpacked"])
    print(f"check same_step_losses_1e-5: {'ok' if same else 'FAILED'} (max rel diff {worst:.2e})", flush=True)
    sides = {name: [timed(run) for run in runs[name]] for name in SIDES}
    for name, per_round in sides.items():
        print(f"{name}: {per_round}", flush=True)
    ratio = ratio_summary([s["pairs_per_s"] for s in sides["packed"]], [s["pairs_per_s"] for s in sides["unpacked"]])
    result = {
        "bench": "packing",
        "workload": asdict(WORKLOAD),
        "micro_batch": MICRO_BATCH,
        "global_batch": GLOBAL_BATCH,
        "warmup_steps": WARMUP_STEPS,
        "timed_steps": TIMED_STEPS,
        "rounds": args.rounds,
        "sides": sides,
        "ratio_pairs_per_s": ratio["median"],
        "ratio_spread": ratio,
        "padding_fraction_unpacked": sides["unpacked"][0]["padding_fraction"],
        "padding_fraction_packed": sides["packed"][0]["padding_fraction"],
        "step_losses_max_rel_diff": worst,
        "checks_passed": same,
        "machine": machine(),
    }
    print_result(result)
    if tmp is not None:
        tmp.cleanup()
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
