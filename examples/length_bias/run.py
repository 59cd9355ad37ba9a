#!/usr/bin/env python
"""The length-bias study in one command (CPU, one single-process run per core at a time):

    python examples/length_bias/run.py [--out-dir runs/length_bias] [--report docs/length_bias_study.md]
                                       [--seeds 3] [--jobs 2] [--quick]

1. writes the task's data and tokenizer (assets.py, task.py: sorting a short list of digits, with
   filler sentences that make responses longer without changing their quality);
2. SFT warm-up of a tiny model from scratch (``--loss-type sft``), one checkpoint for every run;
3. from that checkpoint, every method of :data:`METHODS` on the mixed preference set and on its
   "long" and "short" subsets (chosen longer / shorter), each with ``--seeds`` seeds (data order,
   SamPO's draws and the monitor's sampling); the verbosity monitor samples generations on held-out
   prompts and writes every held-out pair's implicit rewards;
4. the report (report.py): tables with a 95% interval over seeds for every number, curves with
   bands, and the held-out reward margin against the length difference.

A run whose metrics file already reaches its last step is not repeated (delete --out-dir to start
over). ``--quick`` is a smoke run of the whole pipeline (two methods, two seeds, a few steps) that
writes its report into --out-dir; the tests use it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))

# This script's directory is on the path when it runs (python examples/length_bias/run.py).
from assets import write_assets  # noqa: E402
from report import write_report  # noqa: E402

# name -> flags. beta 0.1 for the DPO family; the other settings are each method's paper's (or
# reference implementation's) defaults: docs/losses.md.
METHODS = {
    "DPO": ["--loss-type", "sigmoid", "--length-debias", "none"],
    "SamPO": ["--loss-type", "sigmoid", "--length-debias", "sampo", "--sampo-mask", "shared"],
    "SamPO (independent)": ["--loss-type", "sigmoid", "--length-debias", "sampo", "--sampo-mask", "independent"],
    "SamPO-TopK": ["--loss-type", "sigmoid", "--length-debias", "sampo_topk"],
    "DPO-SANorm": ["--loss-type", "sigmoid", "--length-debias", "sanorm"],
    "Iterative SamPO": ["--loss-type", "sigmoid", "--length-debias", "sampo", "--ref-update", "epoch"],
    "SimPO": ["--loss-type", "simpo", "--length-debias", "none", "--beta", "2.0", "--simpo-gamma", "1.0"],
    "R-DPO": ["--loss-type", "rdpo", "--length-debias", "none", "--rdpo-alpha", "0.02"],
    "LD-DPO": ["--loss-type", "sigmoid", "--length-debias", "ld_dpo", "--ld-alpha", "0.5"],
    "LN-DPO": ["--loss-type", "sigmoid_norm", "--length-debias", "none", "--beta", "5.0"],
    "ORPO": ["--loss-type", "orpo", "--length-debias", "none", "--orpo-lambda", "0.1"],
    "TDPO2": ["--loss-type", "tdpo2", "--length-debias", "none", "--tdpo-alpha", "0.5"],
}
QUICK_METHODS = ("DPO", "SamPO")
SUBSETS = {"mixed": "pairs_all", "long": "pairs_long", "short": "pairs_short"}
"""Report name -> data file: the mixed set (chosen longer in --long-chosen-share of the pairs) and
the paper's long / short subsets."""


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _finished(metrics_file: str, iters: int) -> bool:
    if not os.path.isfile(metrics_file):
        return False
    with open(metrics_file) as f:
        return any(json.loads(line).get("iteration") == iters for line in f if line.strip())


def _inputs_digest(flags: list[str]) -> str:
    """SHA-256 of the data files a run reads (their paths stay the same when their content changes,
    e.g. another --long-chosen-share)."""
    digest = hashlib.sha256()
    for flag in ("--data-path", "--eval-prompts", "--eval-data-path"):
        with open(flags[flags.index(flag) + 1], "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def train(name: str, run_dir: str, iters: int, flags: list[str], log, save: bool = False, force: bool = False) -> tuple[float, bool]:
    """One trainer run (1 process, 1 thread); returns its wall time and whether it ran
    now (False: an earlier invocation finished it, and its recorded wall time is returned).

    A finished run is reused only when its command and the content of its data files are the same
    as now, and not ``force`` (its starting checkpoint was retrained)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    wall_file, spec_file = os.path.join(run_dir, "wall_s.txt"), os.path.join(run_dir, "run_spec.json")
    # The trainer started directly as rank 0 of 1 (the variables torchrun would set, below): a
    # launcher process would add ~1.5 s of start-up to each of the study's 100-odd runs of seconds.
    cmd = [sys.executable, os.path.join(REPO, "launch", "pretrain_sampo.py"), "--config", os.path.join(HERE, "model.yaml"),
           "--train-iters", str(iters), "--metrics-file", metrics,
           "--eval-output", os.path.join(run_dir, "generations.jsonl"),
           "--eval-rewards-output", os.path.join(run_dir, "pair_rewards.jsonl"), *flags]  # fmt: skip
    if save:
        cmd += ["--save", os.path.join(run_dir, "checkpoints")]
    spec = {"command": cmd, "inputs_sha256": _inputs_digest(flags)}
    if not force and _finished(metrics, iters) and os.path.isfile(wall_file) and os.path.isfile(spec_file):
        with open(spec_file) as f:
            if json.load(f) == spec:
                log(f"[{name}] already done ({metrics})")
                return float(open(wall_file).read()), False
    # A half-finished run, or one with other settings, starts over.
    subprocess.run(["rm", "-rf", run_dir], check=True)
    os.makedirs(run_dir)
    # One thread per run: the runs of this tiny model go side by side, one per core (--jobs).
    # MASTER_PORT 0: the one rank's store binds a port the kernel picks (a port chosen here could
    # be taken by another process before the rank binds it).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}  # fmt: skip
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    elapsed = round(time.perf_counter() - start, 1)  # as recorded: a re-rendered report shows the same numbers
    if proc.returncode:
        tail = open(os.path.join(run_dir, "train.log")).read()[-3000:]
        raise RuntimeError(f"[{name}] failed ({proc.returncode}); see {run_dir}/train.log:\n{tail}")
    log(f"[{name}] done in {elapsed:.0f} s")
    with open(wall_file, "w") as f:
        f.write(f"{elapsed:.1f}\n")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    return elapsed, True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(REPO, "runs", "length_bias"), help="runs, data and (--quick) the report")
    parser.add_argument("--report", default=None, help="markdown report; default docs/length_bias_study.md (--quick: in --out-dir)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method and subset (default 3; --quick 2)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs side by side (one thread each)")
    parser.add_argument("--quick", action="store_true", help="smoke run: DPO and SamPO, 2 seeds, a few steps")
    parser.add_argument("--long-chosen-share", type=float, default=0.7, help="share of the mixed set whose chosen response is longer")
    parser.add_argument("--sft-iters", type=int, default=None, help="SFT warm-up steps (default 500; --quick 20)")
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--pref-iters", type=int, default=None, help="preference steps per run (default 60; --quick 4)")
    # 1e-4 made DPO's accuracy rise, then fall below SFT's by step 60 while lengths kept growing;
    # 1e-3 wrecked every policy of the first edition within 10 steps.
    parser.add_argument("--pref-lr", type=float, default=5e-5)
    parser.add_argument("--eval-interval", type=int, default=None, help="monitor interval of the preference runs (default 15; --quick 2)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts, sampled twice each (default 200; --quick 16)")
    parser.add_argument("--data-seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = {"seeds": (3, 2), "sft_iters": (500, 20), "pref_iters": (60, 4), "eval_interval": (15, 2), "eval_prompts": (200, 16)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.report is None:
        args.report = os.path.join(args.out_dir, "length_bias_study.md") if args.quick else os.path.join(REPO, "docs", "length_bias_study.md")
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (an interval over seeds needs two)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    lock = threading.Lock()

    def log(text: str) -> None:
        with lock:
            print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    data = write_assets(os.path.join(args.out_dir, "data"), args.data_seed, args.long_chosen_share, num_eval_prompts=args.eval_prompts)
    log(f"data and tokenizer in {os.path.join(args.out_dir, 'data')}")
    common = ["--tokenizer-model", data["tokenizer"], "--eval-prompts", data["eval_prompts"], "--eval-data-path", data["heldout"]]
    sft_dir = os.path.join(args.out_dir, "sft")
    sft_s, sft_ran = train("SFT", sft_dir, args.sft_iters,
                              [*common, "--eval-interval", str(max(1, args.sft_iters // 5)), "--data-path", data["sft"],
                               "--loss-type", "sft", "--length-debias", "none",
                               "--lr", str(args.sft_lr), "--min-lr", str(args.sft_lr / 10)], log, save=True)  # fmt: skip
    reused = 0.0 if sft_ran else sft_s
    sft_ckpt = os.path.join(sft_dir, "checkpoints")

    methods = {name: METHODS[name] for name in QUICK_METHODS} if args.quick else METHODS
    runs = [(method, subset, seed, os.path.join(args.out_dir, subset, slug(method), f"seed{seed}"))
            for subset in SUBSETS for method in methods for seed in range(1, args.seeds + 1)]  # fmt: skip
    log(f"{len(runs)} preference runs ({len(methods)} methods x {len(SUBSETS)} data sets x {args.seeds} seeds), {args.jobs} at a time")
    done = [0]

    def one(run: tuple[str, str, int, str]) -> tuple[float, bool]:
        method, subset, seed, run_dir = run
        flags = [*common, "--eval-interval", str(args.eval_interval), "--data-path", data[SUBSETS[subset]],
                 "--load", sft_ckpt, "--ref-load", sft_ckpt, "--finetune", "--seed", str(seed),
                 "--lr", str(args.pref_lr), "--min-lr", str(args.pref_lr / 10), *methods[method]]  # fmt: skip
        result = train(f"{method} / {subset} / seed {seed}", run_dir, args.pref_iters, flags, lambda text: None, force=sft_ran)
        with lock:
            done[0] += 1
            count = done[0]
        log(f"[{count}/{len(runs)}] {method} / {subset} / seed {seed}: {result[0]:.0f} s")
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, runs))
    pref_times = [seconds for seconds, _ in results]
    wall_file = os.path.join(args.out_dir, "wall_s.txt")
    if sft_ran or any(ran for _, ran in results) or not os.path.isfile(wall_file):
        # Runs done by an earlier invocation count with the wall time they took then (divided by --jobs).
        reused += sum(seconds for seconds, ran in results if not ran) / max(1, args.jobs)
        total = round(time.perf_counter() - start + reused, 1)  # as recorded
        with open(wall_file, "w") as f:
            f.write(f"{total:.1f}\n")
    else:  # nothing ran now: the report is re-rendered with the wall time the study took
        total = float(open(wall_file).read())
    settings = {**vars(args), "methods": methods, "sft_s": sft_s, "pref_s": pref_times}
    report = write_report(args.report, sft_dir, runs, data, settings, total)
    log(f"report: {report} (total {total / 60:.1f} min)")


if __name__ == "__main__":
    main()
