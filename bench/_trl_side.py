"""TRL's side of ``bench/vs_trl.py``: ``DPOTrainer`` on the same workload, timed step by step; writes
a JSON result in the same form as ``_ours_side.py``. Runs with TRL on ``PYTHONPATH`` (the bench's own
install, see ``vs_trl.py``).

Data order: the dataset is handed to TRL already in sampo-megatron's epoch order
(``PairDataset.epoch_order(0)``, passed as ``--order``) with ``train_sampling_strategy="sequential"``,
so step ``s`` of both trainers sees the same four pairs.

    python bench/_trl_side.py --work-dir DIR --ref-mode replica|cache --order 3,1,... --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--ref-mode", choices=["replica", "cache"], required=True)
    parser.add_argument("--order", required=True, help="comma-separated pair indices, in training order")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    work_dir = Path(args.work_dir)
    paths = json.loads((work_dir / "paths.json").read_text())
    work = json.loads((work_dir / "workload.json").read_text())
    records = [json.loads(line) for line in Path(paths["pairs"]).read_text().splitlines()]
    order = [int(i) for i in args.order.split(",")]
    dataset = datasets.Dataset.from_list([{**records[i], "sample_id": i} for i in order])

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["hf_model"], dtype=torch.float32)
    with torch.no_grad():
        flat = [p.detach().double() for p in model.parameters()]
        checksum = {"sum": sum(x.sum() for x in flat).item(), "sum_sq": sum((x * x).sum() for x in flat).item()}

    config = DPOConfig(
        output_dir=str(work_dir / "trl_out"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        loss_type=["sigmoid"],
        beta=0.1,
        max_length=work["max_length"],
        precompute_ref_log_probs=args.ref_mode == "cache",
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=work["seed"],
        bf16=False,
        fp16=False,
    )

    step_ends: list[float] = []
    clock = {"start": None}

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter() - clock["start"])

    class RecordingDPOTrainer(DPOTrainer):
        """Records each step's exact loss and the mean summed log-probs (TRL's ``logps/*``)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            metrics = self._metrics["train"]
            recorded.append(
                {
                    "loss": (loss[0] if isinstance(loss, tuple) else loss).item(),
                    "logps/chosen": metrics["logps/chosen"][-1],
                    "logps/rejected": metrics["logps/rejected"][-1],
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
            )
            return loss

    recorded: list[dict] = []
    trainer = RecordingDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()]
    )
    prepared = trainer.train_dataset
    token_ids = {str(row["sample_id"]): [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]] for row in prepared}
    trainer.train()
    opt = trainer.optimizer
    group = opt.param_groups[0]
    steps_seen = [[int(prepared[s * args.batch + j]["sample_id"]) for j in range(args.batch)] for s in range(args.steps)]
    result = {
        "side": "trl",
        "ref_mode": args.ref_mode,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "step_ends_s": step_ends,
        "steps": recorded,
        "order": steps_seen,
        "tokens_per_step": [
            sum(2 * len(token_ids[str(i)][0]) + len(token_ids[str(i)][1]) + len(token_ids[str(i)][2]) for i in ids)
            for ids in steps_seen
        ],
        "token_ids": token_ids,
        "weights": checksum,
        "optimizer": {
            "name": type(getattr(opt, "optimizer", opt)).__name__.lower(),
            "lr": config.learning_rate,
            "betas": list(group["betas"]),
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "schedule": str(config.lr_scheduler_type).split(".")[-1].lower(),
            "warmup_steps": config.warmup_steps,
            "max_grad_norm": config.max_grad_norm,
        },  # fmt: skip
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
