#!/usr/bin/env python
"""The length-bias study in one command (CPU, single process per run):

    python examples/length_bias/run.py [--out-dir runs/length_bias] [--report docs/length_bias_study.md]

1. writes the toy task's data and tokenizer (assets.py);
2. SFT warm-up of a tiny model from scratch (``--loss-type sft``);
3. from the same SFT checkpoint: DPO, SamPO, SimPO and R-DPO on the mixed preference set, and DPO
   and SamPO on its "long" and "short" subsets (chosen longer / shorter), each with the verbosity
   monitor (sampled generations on every prompt, held-out implicit rewards);
4. plots (tools/plot_metrics.py) and a markdown report with the numbers (report.py).

A run whose metrics file already reaches its last step is not repeated (delete --out-dir to start over).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))

# This script's directory is on the path when it runs (python examples/length_bias/run.py).
from assets import write_assets  # noqa: E402
from report import write_report  # noqa: E402

# name -> (data set, flags). beta 0.1 for the DPO family; SimPO's beta / gamma as in its paper's range.
METHODS = {
    "DPO": ("pairs_all", ["--loss-type", "sigmoid", "--length-debias", "none"]),
    "SamPO": ("pairs_all", ["--loss-type", "sigmoid", "--length-debias", "sampo"]),
    "SimPO": ("pairs_all", ["--loss-type", "simpo", "--length-debias", "none", "--beta", "2.0", "--simpo-gamma", "1.0"]),
    "R-DPO": ("pairs_all", ["--loss-type", "rdpo", "--length-debias", "none", "--rdpo-alpha", "0.02"]),
    "DPO long": ("pairs_long", ["--loss-type", "sigmoid", "--length-debias", "none"]),
    "SamPO long": ("pairs_long", ["--loss-type", "sigmoid", "--length-debias", "sampo"]),
    "DPO short": ("pairs_short", ["--loss-type", "sigmoid", "--length-debias", "none"]),
    "SamPO short": ("pairs_short", ["--loss-type", "sigmoid", "--length-debias", "sampo"]),
}


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "")


def _finished(metrics_file: str, iters: int) -> bool:
    if not os.path.isfile(metrics_file):
        return False
    import json

    with open(metrics_file) as f:
        return any(json.loads(line).get("iteration") == iters for line in f if line.strip())


def train(name: str, run_dir: str, iters: int, flags: list[str], log) -> tuple[float, bool]:
    """One trainer launch (torchrun, 1 process); returns its wall time and whether it ran now
    (False: an earlier invocation finished it, and its recorded wall time is returned)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    wall_file = os.path.join(run_dir, "wall_s.txt")
    if _finished(metrics, iters) and os.path.isfile(wall_file):
        log(f"[{name}] already done ({metrics})")
        return float(open(wall_file).read()), False
    # A half-finished run starts over (its checkpoints and logs would mix with the new ones).
    subprocess.run(["rm", "-rf", run_dir], check=True)
    os.makedirs(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           os.path.join(REPO, "launch", "pretrain_sampo.py"), "--config", os.path.join(HERE, "model.yaml"),
           "--train-iters", str(iters), "--save", os.path.join(run_dir, "checkpoints"), "--metrics-file", metrics,
           "--eval-output", os.path.join(run_dir, "generations.jsonl"), *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    log(f"[{name}] {' '.join(cmd[6:])}")
    with open(os.path.join(run_dir, "train.log"), "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        tail = open(os.path.join(run_dir, "train.log")).read()[-3000:]
        raise RuntimeError(f"[{name}] failed ({proc.returncode}); see {run_dir}/train.log:\n{tail}")
    log(f"[{name}] done in {elapsed:.0f} s")
    with open(wall_file, "w") as f:
        f.write(f"{elapsed:.1f}\n")
    return elapsed, True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(REPO, "runs", "length_bias"))
    parser.add_argument("--report", default=os.path.join(REPO, "docs", "length_bias_study.md"))
    parser.add_argument("--long-chosen-share", type=float, default=0.7, help="share of the mixed set whose chosen response is longer")
    parser.add_argument("--sft-iters", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--pref-iters", type=int, default=80)
    # 1e-3 wrecked every policy within 10 steps (repetitive text), whatever the method: see the report.
    parser.add_argument("--pref-lr", type=float, default=1e-4)
    parser.add_argument("--eval-interval", type=int, default=10, help="monitor interval of the preference runs")
    parser.add_argument("--sft-eval-interval", type=int, default=50, help="monitor interval of the SFT warm-up")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args(argv)

    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    data = write_assets(os.path.join(args.out_dir, "data"), args.seed, args.long_chosen_share)
    log(f"data and tokenizer in {os.path.join(args.out_dir, 'data')}")
    common = ["--tokenizer-model", data["tokenizer"], "--eval-prompts", data["eval_prompts"], "--eval-data-path", data["heldout"]]
    sft_dir = os.path.join(args.out_dir, "sft")
    times, reused = {}, 0.0
    times["SFT"], ran = train("SFT", sft_dir, args.sft_iters,
                          [*common, "--eval-interval", str(args.sft_eval_interval), "--data-path", data["sft"],
                           "--loss-type", "sft", "--length-debias", "none",
                           "--lr", str(args.sft_lr), "--min-lr", str(args.sft_lr / 10)], log)  # fmt: skip
    reused += 0.0 if ran else times["SFT"]
    sft_ckpt = os.path.join(sft_dir, "checkpoints")
    runs = {}
    for name, (dataset, flags) in METHODS.items():
        run_dir = os.path.join(args.out_dir, _slug(name))
        times[name], ran = train(name, run_dir, args.pref_iters,
                            [*common, "--eval-interval", str(args.eval_interval), "--data-path", data[dataset], "--load", sft_ckpt, "--ref-load", sft_ckpt, "--finetune",
                             "--lr", str(args.pref_lr), "--min-lr", str(args.pref_lr / 10), *flags], log)  # fmt: skip
        runs[name] = run_dir
        reused += 0.0 if ran else times[name]
    # Runs done by an earlier invocation count with the wall time they took then.
    total = time.perf_counter() - start + reused
    report = write_report(args.report, sft_dir, runs, data, vars(args), times, total)
    log(f"report: {report} (total {total / 60:.1f} min)")


if __name__ == "__main__":
    main()
