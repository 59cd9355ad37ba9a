"""sampo-megatron's side of ``bench/vs_trl.py``: the Trainer in this process (TP=1, one rank, gloo),
timed step by step; writes a JSON result (times, losses, log-probs, token ids, weights' checksum,
optimizer settings, peak RSS).

    python bench/_ours_side.py --work-dir DIR --ref-mode replica|cache --out RESULT.json [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trainer_flags(paths: dict, work: dict, ref_mode: str, steps: int, micro_batch: int, global_batch: int) -> list[str]:
    """The run, in the trainer's flags: TRL's settings (sigmoid DPO, beta 0.1, AdamW lr 1e-6 linearly
    decayed to 0 without warm-up, betas 0.9/0.999, eps 1e-8, no weight decay, clipping 1.0)."""
    flags = [
        "--load", paths["megatron"], "--data-path", paths["pairs"], "--prompt-template", "plain",
        "--tensor-model-parallel-size", "1", "--micro-batch-size", str(micro_batch),
        "--global-batch-size", str(global_batch), "--seq-length", str(work["max_length"]),
        "--train-iters", str(steps), "--lr", "1e-6", "--min-lr", "0", "--lr-warmup-fraction", "0",
        "--lr-decay-style", "linear", "--weight-decay", "0", "--adam-beta1", "0.9", "--adam-beta2", "0.999",
        "--adam-eps", "1e-8", "--clip-grad", "1.0", "--loss-type", "sigmoid", "--length-debias", "none",
        "--beta", "0.1", "--ref-mode", ref_mode, "--seed", str(work["seed"]), "--log-interval", "1000000",
    ]  # fmt: skip
    if ref_mode == "cache":
        flags += ["--ref-cache-dir", str(Path(paths["pairs"]).parent / "ours_ref_cache")]
    return flags


def single_process_env() -> None:
    """torch.distributed's variables for a world of one rank, on a free local port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def weights_checksum(chunks) -> dict:
    """Sum and sum of squares of all parameters (float64): independent of how QKV / gate-up are
    fused and of the zero vocabulary padding rows, so they equal the HF model's."""
    import torch

    total = torch.zeros(2, dtype=torch.float64)
    for chunk in chunks:
        for p in chunk.parameters():
            x = p.detach().double()
            total += torch.stack([x.sum(), (x * x).sum()])
    return {"sum": total[0].item(), "sum_sq": total[1].item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--ref-mode", choices=["replica", "cache"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer flags")
    args = parser.parse_args()

    import shutil

    import torch

    torch.set_num_threads(args.threads)
    single_process_env()
    from sampo_megatron.config import parse_config
    from sampo_megatron.plan import resolve
    from sampo_megatron.training.trainer import Trainer

    work_dir = Path(args.work_dir)
    paths = json.loads((work_dir / "paths.json").read_text())
    work = json.loads((work_dir / "workload.json").read_text())
    shutil.rmtree(work_dir / "ours_ref_cache", ignore_errors=True)  # computed in the run (first step)
    cfg = parse_config(trainer_flags(paths, work, args.ref_mode, args.steps, args.micro_batch, args.global_batch) + args.extra)
    trainer = Trainer(resolve(cfg))
    checksum = weights_checksum(trainer.chunks)
    token_ids = {str(p.sample_id): [p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in trainer.feed.batches.dataset.pairs}
    order = [[p.sample_id for p in trainer.feed.batches.batch_at(s)[1]] for s in range(args.steps)]
    step_ends, steps = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        metrics = trainer.train_step(step)
        step_ends.append(time.perf_counter() - start)
        keys = ("loss", "logps/chosen", "logps/rejected", "lr", "grad_norm", "step_time_s", "padding_fraction", "pack/sequences_per_row")
        steps.append({k: metrics[k] for k in keys})
    opt = cfg.optimizer
    result = {
        "side": "sampo-megatron",
        "ref_mode": args.ref_mode,
        "step_ends_s": step_ends,
        "steps": steps,
        "order": order,
        "tokens_per_step": [
            sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in trainer.feed.batches.batch_at(s)[1])
            for s in range(args.steps)
        ],
        "token_ids": token_ids,
        "weights": checksum,
        "optimizer": {
            "name": "adamw",
            "lr": opt.lr,
            "betas": [opt.adam_beta1, opt.adam_beta2],
            "eps": opt.adam_eps,
            "weight_decay": opt.weight_decay,
            "schedule": cfg.schedule.lr_decay_style,
            "warmup_steps": int(cfg.schedule.lr_warmup_fraction * args.steps),
            "max_grad_norm": opt.clip_grad,
        },  # fmt: skip
        "micro_batch": args.micro_batch,
        "global_batch": args.global_batch,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    trainer.close()
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
