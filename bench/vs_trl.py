"""sampo-megatron against Hugging Face TRL's ``DPOTrainer`` on the same DPO work, side by side.

The workload (``_dpo_workload.py``, generated locally and seeded): a random-init Llama (4 layers,
hidden 256, intermediate 688, 8 heads, 4 KV heads, vocabulary 8000, untied, fp32), a word-level
tokenizer of exactly 8000 ids, 48 pairs with 64-token prompts and 100-400-token responses (+ EOS).
Training: sigmoid DPO, beta 0.1, AdamW lr 1e-6 linearly decayed without warm-up, clipping 1.0, 4
pairs per step, max length 512, 2 warm-up steps then 10 timed steps, 2 threads, fp32, no
gradient checkpointing. TRL runs with batch 4 (padded to the longest of its 8 sequences); ours with
micro-batches of 1 pair x 4 accumulation steps (each padded to its own longest sequence): both
minimise the mean loss over the 4 pairs of a step.

Each side runs in its own subprocess (its peak RSS is its own), first with a reference forward every
step (TRL's ``ref_model``, our ``--ref-mode replica``), then with precomputed reference log-probs
(TRL's ``precompute_ref_log_probs``, our ``--ref-mode cache``). Ours runs twice per round: with
``--no-pack-sequences`` (the row the ratio is of) and with ``--pack-sequences`` (TRL unpacked: its
``padding_free`` needs flash-attention, a GPU).
The sides alternate in rounds (TRL, ours, ours packed, TRL, ...; ``--rounds``, default 3), so a
load spike on the machine falls on every side; each ratio is the median of the per-round ratios,
reported with its spread (min, max). Before the timings count, the run
checks that both sides computed the same thing: same weights (sum and sum of squares of all
parameters), same token ids, same data order, same optimizer settings and learning rates; the first
step's summed policy log-probs of chosen and rejected (TRL's ``logps/chosen``, ``logps/rejected``)
agree to 1e-5 relative and every step's loss to 1e-4. A failed check exits non-zero.

TRL 1.16.0 and accelerate 1.15.0 are installed (``pip --target``, no dependencies: the rest is
already in the project's environment) into ``<venv>/trl-bench`` when missing, and only the TRL
subprocess has them on its path; the project's own environment is left as it is.

    python bench/vs_trl.py [--work-dir DIR] [--modes replica,cache] [--threads 2]

The last line is one JSON object: per mode, each side's pairs/s, tokens/s and peak RSS per round,
and the medians ``ratio_pairs_per_s`` (ours / TRL), ``packed_ratio_pairs_per_s`` (ours packed /
TRL) and ``ratio_peak_rss`` (ours / TRL), each with its spread.
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

TRL_PINS = ["trl==1.16.0", "accelerate==1.15.0"]
WARMUP_STEPS, TIMED_STEPS = 2, 10
LOGPS_RTOL, LOSS_RTOL = 1e-5, 1e-4


def trl_path() -> Path:
    """TRL's own install directory, beside the environment running this script."""
    return Path(sys.prefix) / "trl-bench"


def ensure_trl() -> Path:
    target = trl_path()
    probe = "import trl, accelerate; assert trl.__version__ == '1.16.0', trl.__version__"
    env = {**os.environ, "PYTHONPATH": str(target)}
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
        print(f"installing {' '.join(TRL_PINS)} into {target} (the bench's TRL side only) ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target), *TRL_PINS],
            check=True,
        )
    return target


def run_side(script: str, args: list[str], out: Path, threads: int, extra_path: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        [str(p) for p in (extra_path, REPO) if p is not None] + [os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    # --out and --threads first: our side's --extra takes every argument after it
    cmd = [sys.executable, str(Path(__file__).parent / script), "--out", str(out), "--threads", str(threads), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return json.loads(out.read_text())


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def agreement(ours: dict, trl: dict) -> dict:
    """The checks that both sides computed the same thing; each entry ``[passed, detail]``."""
    checks = {}
    w_o, w_t = ours["weights"], trl["weights"]
    checks["same_weights"] = [
        rel_diff(w_o["sum"], w_t["sum"]) < 1e-9 and rel_diff(w_o["sum_sq"], w_t["sum_sq"]) < 1e-9,
        {"ours": w_o, "trl": w_t},
    ]
    mismatched = [k for k in trl["token_ids"] if trl["token_ids"][k] != ours["token_ids"].get(k)]
    checks["same_token_ids"] = [
        not mismatched and len(trl["token_ids"]) == len(ours["token_ids"]),
        {"mismatched_pairs": mismatched[:5]},
    ]
    checks["same_data_order"] = [ours["order"] == trl["order"], {"first_step": [ours["order"][0], trl["order"][0]]}]
    opt_o, opt_t = ours["optimizer"], trl["optimizer"]
    checks["same_optimizer"] = [opt_o == opt_t, {"ours": opt_o, "trl": opt_t}]
    lrs = [[s["lr"] for s in side["steps"]] for side in (ours, trl)]
    checks["same_lr_per_step"] = [all(rel_diff(a, b) < 1e-9 or a == b for a, b in zip(*lrs)) and len(lrs[0]) == len(lrs[1]), lrs]
    first = {k: [ours["steps"][0][k], trl["steps"][0][k]] for k in ("logps/chosen", "logps/rejected")}
    worst = max(rel_diff(a, b) for a, b in first.values())
    checks["first_step_logps_1e-5"] = [worst <= LOGPS_RTOL, {"max_rel_diff": worst, **first}]
    losses = [[s["loss"] for s in side["steps"]] for side in (ours, trl)]
    worst = max(rel_diff(a, b) for a, b in zip(*losses))
    checks["step_losses_1e-4"] = [
        worst <= LOSS_RTOL and len(losses[0]) == len(losses[1]),
        {"max_rel_diff": worst, "ours": losses[0], "trl": losses[1]},
    ]
    return checks


def throughput(side: dict) -> dict:
    """Pairs and tokens per second over the timed steps: wall time from the end of the last warm-up
    step to the end of the last step (everything a step does, data included)."""
    ends = side["step_ends_s"]
    seconds = ends[WARMUP_STEPS + TIMED_STEPS - 1] - ends[WARMUP_STEPS - 1]
    pairs = sum(len(ids) for ids in side["order"][WARMUP_STEPS : WARMUP_STEPS + TIMED_STEPS])
    tokens = sum(side["tokens_per_step"][WARMUP_STEPS : WARMUP_STEPS + TIMED_STEPS])
    return {
        "pairs_per_s": round(pairs / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "timed_seconds": round(seconds, 3),
        "peak_rss_gb": round(side["peak_rss_bytes"] / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="where the workload is generated (reused if present); default: a temporary directory")
    parser.add_argument("--modes", default="replica,cache", help="reference modes to compare: replica, cache or both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating TRL, ours, ours packed")
    args = parser.parse_args()

    work = Workload()
    steps = WARMUP_STEPS + TIMED_STEPS
    if work.pairs != steps * 4:
        raise ValueError("the workload's pairs must fill the warm-up and timed steps exactly (one epoch)")
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="vs_trl_")
    work_dir = Path(args.work_dir or tmp.name)
    target = ensure_trl()
    print(f"building the workload in {work_dir} ...", flush=True)
    paths = build(work, work_dir)
    (work_dir / "paths.json").write_text(json.dumps(paths))

    from sampo_megatron.data import PairDataset

    # Both sides see pairs in the order our trainer uses for epoch 0 (the run is exactly one epoch).
    order = PairDataset(list(range(work.pairs)), work.seed).epoch_order(0)
    result = {"bench": "vs_trl", "workload": asdict(work), "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS,
              "rounds": args.rounds}  # fmt: skip
    all_passed = True
    for mode in args.modes.split(","):
        common = ["--work-dir", str(work_dir), "--ref-mode", mode, "--steps", str(steps)]
        sides = {
            "trl": lambda r: run_side("_trl_side.py", [*common, "--order", ",".join(map(str, order))],
                                      work_dir / f"trl_{mode}_{r}.json", args.threads, target),
            "ours": lambda r: run_side("_ours_side.py", [*common, "--extra", "--no-pack-sequences"],
                                       work_dir / f"ours_{mode}_{r}.json", args.threads),
            "ours_packed": lambda r: run_side("_ours_side.py", [*common, "--extra", "--pack-sequences"],
                                              work_dir / f"ours_packed_{mode}_{r}.json", args.threads),
        }  # fmt: skip
        runs = in_rounds(sides, args.rounds, log=lambda text, **kw: print(f"[{mode}] {text}", **kw))
        trl, ours = runs["trl"][0], runs["ours"][0]
        checks = agreement(ours, trl)
        packed_checks = agreement(runs["ours_packed"][0], trl)
        checks["packed_step_losses_1e-4"] = packed_checks["step_losses_1e-4"]
        passed = all(ok for ok, _ in checks.values())
        all_passed &= passed
        timings = {name: [throughput(run) for run in side_runs] for name, side_runs in runs.items()}
        for name, (ok, detail) in checks.items():
            print(f"[{mode}] check {name}: {'ok' if ok else 'FAILED'} {json.dumps(detail)[:300]}", flush=True)
        for name, per_round in timings.items():
            print(f"[{mode}] {name}: {per_round}", flush=True)
        pairs_per_s = {name: [t["pairs_per_s"] for t in per_round] for name, per_round in timings.items()}
        ratio = ratio_summary(pairs_per_s["ours"], pairs_per_s["trl"])
        packed_ratio = ratio_summary(pairs_per_s["ours_packed"], pairs_per_s["trl"])
        rss = ratio_summary([t["peak_rss_gb"] for t in timings["ours"]], [t["peak_rss_gb"] for t in timings["trl"]])
        result[mode] = {
            "trl": timings["trl"],
            "ours": timings["ours"],
            "ours_packed": timings["ours_packed"],
            "ratio_pairs_per_s": ratio["median"],
            "ratio_spread": ratio,
            "packed_ratio_pairs_per_s": packed_ratio["median"],
            "packed_ratio_spread": packed_ratio,
            "ratio_peak_rss": rss["median"],
            "checks_passed": passed,
            "checks": {name: ok for name, (ok, _) in checks.items()},
            "first_step_logps_max_rel_diff": checks["first_step_logps_1e-5"][1]["max_rel_diff"],
            "step_losses_max_rel_diff": checks["step_losses_1e-4"][1]["max_rel_diff"],
        }
        result["versions"] = trl["versions"]
    if "replica" in result:  # the headline figures: a reference forward every step
        result["ratio_pairs_per_s"] = result["replica"]["ratio_pairs_per_s"]
        result["ratio_peak_rss"] = result["replica"]["ratio_peak_rss"]
    result["checks_passed"] = all_passed
    result["machine"] = machine()
    print_result(result)
    if tmp is not None:
        tmp.cleanup()
    if not all_passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
