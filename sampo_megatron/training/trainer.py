"""The SamPO / DPO training loop on megatron-core. It only wires the parts together:

- runtime/ : process groups, compat, model-parallel state; model, optimizer and schedule builders;
- feed.py : this rank's micro-batches of each step;
- reference.py : the reference (none, a frozen replica, or a log-prob cache);
- resume.py : fresh start, ``--load`` or resume (with the configuration check of run_config.py);
- step.py : megatron-core's forward_step / loss_func;
- nonfinite.py, metrics.py, monitor.py, run_lock.py : safety, logging, evaluation, the run lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from functools import partial

import torch.distributed as dist

from ..data.tokenizer import copy_tokenizer_into
from ..losses import LOSSES, RunningMean
from ..models.architecture import model_architecture, run_architecture, write_architecture
from ..plan import RunPlan
from ..runtime.builders import build_chunks, build_optimizer, build_scheduler, run_transformer_config, wrap_ddp
from ..runtime.checkpointing import CheckpointContents, select_checkpoint
from ..runtime.distributed import close_distributed, init_distributed, init_model_parallel, rank0_print
from .exit import ExitConditions
from .feed import StepFeed, schedule_seq_length
from .metrics import MetricsLogger, peak_memory_gib, reduce_step_metrics
from .monitor import VerbosityMonitor
from .nonfinite import NonFiniteError, nonfinite_message, nonfinite_parts
from .reference import CachedReference, NoReference, Reference, ReferenceEnv, ReferenceSource, ReplicaReference
from .reference_cache import ReferenceCache
from .resume import start
from .run_config import format_config, resolved_record, write_run_config
from .run_lock import lock_save_dir
from .saving import Saver
from .step import StepContext, policy_forward_step
from .wandb_writer import WandbWriter, wandb_save_dir

# The tokenizer travels with every checkpoint, here (models/architecture.py stores the path relative).
CHECKPOINT_TOKENIZER_DIR = "tokenizer"


class Trainer:
    """Builds everything from a resolved :class:`RunPlan`; :meth:`train` runs the loop, :meth:`close` ends it."""

    def __init__(self, plan: RunPlan) -> None:
        if not isinstance(plan, RunPlan):
            raise TypeError(f"Trainer takes a RunPlan, got {type(plan).__name__}: Trainer(resolve(cfg)) (sampo_megatron/plan.py)")
        self.plan = plan
        self.cfg = cfg = plan.config  # frozen: nothing below changes what the plan decided
        # first: a signal during start-up is recorded too (the run stops after its first step)
        self.exits = ExitConditions(cfg.operations)
        self.run_lock = None
        try:  # a failed start leaves nothing behind either (signal handlers, lock, process groups)
            init_distributed()
            self.tconfig = run_transformer_config(plan)
            if dist.get_world_size() != plan.world_size:
                raise RuntimeError(f"the plan was resolved for {plan.world_size} processes, but {dist.get_world_size()} run")
            self.par = init_model_parallel(cfg.parallel, cfg.training.seed, plan.virtual_pipeline_size)
            self.exits.device = self.par.device
            self.run_lock = lock_save_dir(cfg.checkpoint.save)
            self._build()
        except BaseException:
            self.close(synchronize=False)
            raise

    def _build(self) -> None:
        cfg, par, plan = self.cfg, self.par, self.plan
        self.tokenizer, self.vocab_size = plan.tokenizer, plan.vocab_size
        self.feed = StepFeed(plan, par)
        self.train_iters = self.feed.train_iters
        rank0_print(format_config(cfg))
        self.chunks = build_chunks(plan, self.tconfig)
        self.model = wrap_ddp(cfg, self.tconfig, self.chunks)
        self.optimizer = build_optimizer(cfg, self.tconfig, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.train_iters)
        self.reward_mean = RunningMean(group=par.dp_group)
        tr = cfg.training
        self.ctx = StepContext(cfg.loss, par.tp_group, self.vocab_size, self.reward_mean, par.cp_group, tr.response_logits_only,
                               fused_logprobs=tr.fused_logprobs, fused_chunk_size=tr.fused_logprobs_chunk_size,
                               packed=plan.pack_sequences)  # fmt: skip
        begin = start(cfg, self.chunks, self.optimizer, self.scheduler, self.reward_mean, select=self._select,
                      run_record=self._run_record(), vocab_size=self.vocab_size, dp_group=par.dp_cp_group, message=rank0_print)  # fmt: skip
        self.state, self.resumed_from = begin.state, begin.resumed_from
        self.reference = self._make_reference()
        self.reference.restore(self.resumed_from)
        if LOSSES[cfg.loss.loss_type].needs_token_kl:  # TDPO (validation allows only the replica)
            self.ctx.ref_output_weight = self.reference.output_weight
        log = cfg.logging
        wandb = None
        if log.wandb_project:
            wandb = partial(WandbWriter, log.wandb_project, log.wandb_exp_name,
                            wandb_save_dir(log.wandb_save_dir, cfg.checkpoint.save), cfg.to_dict())  # fmt: skip
        self.logger = MetricsLogger(par.logs, self.train_iters, log.log_interval, log.metrics_file, log.tensorboard_dir,
                                    start_iteration=self.state.iteration, wandb=wandb)  # fmt: skip
        self.saver = Saver(cfg.checkpoint, par.dp_cp_group, self.logger.message)
        self.monitor = None
        if cfg.eval.eval_interval:
            self.monitor = VerbosityMonitor(cfg, self.tokenizer, self.vocab_size, self.model, self.reference.chunks, self.ctx, par,
                                            self.logger.message)  # fmt: skip

    def _make_reference(self) -> Reference:
        cfg = self.cfg
        env = ReferenceEnv(
            ctx=self.ctx, par=self.par, seq_length=cfg.training.seq_length, vocab_size=self.vocab_size, policy=self.model,
            new_chunks=lambda: build_chunks(self.plan, frozen=True), select=self._select, message=rank0_print,
            micro_batches=lambda step: self.feed.micro_batches(step)[1], steps_per_epoch=self.feed.steps_per_epoch,
            iterative=cfg.reference.ref_update == "epoch",
        )  # fmt: skip
        source, version = ReferenceSource.from_dict(self.state.reference_source), self.state.reference_version
        if LOSSES[cfg.loss.loss_type].reference_free:
            return NoReference(env, source, version)
        if cfg.reference.ref_mode == "cache":
            env.cache_fingerprint = {**self.feed.cache_fingerprint(), "seq_length": cfg.training.seq_length}
            # the architecture as saved with checkpoints (a resume adopts it: the same fingerprint)
            architecture = model_architecture(dataclasses.replace(cfg.model, vocab_size=self.vocab_size))
            env.model_fingerprint = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode()).hexdigest()[:16]
            env.run_dir = cfg.checkpoint.save or ""
            directory = cfg.reference.ref_cache_dir or os.path.join(cfg.checkpoint.save, "ref_cache")
            return CachedReference(env, source, ReferenceCache(directory, self.feed.num_pairs, cfg.training.seq_length), version)
        return ReplicaReference(env, source, version)

    def _select(self, path: str) -> str | None:
        """The checkpoint to load from ``path``, verified (runtime/checkpointing.py)."""
        c = self.cfg.checkpoint
        return select_checkpoint(path, c.verify_checkpoint, c.checkpoint_fallback, c.trust_checkpoint, log=rank0_print)

    def _run_record(self) -> dict:
        record = resolved_record(self.cfg, self.feed.derived)
        record["config"]["model"]["vocab_size"] = self.vocab_size  # as the saved architecture says
        return record

    # ----------------------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        begin = time.perf_counter()
        epoch, micro_batches = self.feed.micro_batches(step)
        self.reference.on_step(epoch, step)
        self.reference.attach(micro_batches)
        reward_mean_before = self.reward_mean.state_dict()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(micro_batches) for _ in self.model]
        losses_reduced = get_forward_backward_func()(
            forward_step_func=partial(policy_forward_step, self.ctx, epoch),
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=schedule_seq_length(micro_batches, self.cfg.training.seq_length, self.plan.pack_sequences),
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=False,
        )
        lr = self.optimizer.param_groups[0]["lr"]
        nonfinite = self._nonfinite(step, losses_reduced)
        if nonfinite:
            update_successful, grad_norm = False, None
            self.reward_mean.load_state_dict(reward_mean_before)  # the step never happened
        else:
            update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        elapsed = time.perf_counter() - begin
        metrics = reduce_step_metrics(losses_reduced, self.par.dp_group) if self.par.is_last_stage else {}
        self._report_step(step, metrics, nonfinite, grad_norm)
        pairs, tokens = self.feed.tokens_of_step(step)
        metrics.update(
            epoch=float(epoch), lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            skipped_steps=float(self.state.skipped_steps), pairs_per_s=pairs / elapsed, tokens_per_s=tokens / elapsed,
            step_time_s=elapsed, peak_memory_gib=peak_memory_gib(), **self.feed.padding_stats(step),
        )  # fmt: skip
        self.state.iteration = step + 1
        self.state.reward_mean = self.reward_mean.state_dict()
        return metrics

    def _nonfinite(self, step: int, losses_reduced: list[dict]) -> list[str]:
        if not self.cfg.operations.check_for_nan_in_loss_and_grad:
            return []
        local = [float(v) for out in losses_reduced for v in out["sums"].values()] if self.par.is_last_stage else []
        return nonfinite_parts(step + 1, self.model, local)

    def _report_step(self, step: int, metrics: dict, nonfinite: list[str], grad_norm) -> None:
        """Stop (or count a skipped step) on a non-finite step; warn of a vanished gradient."""
        if nonfinite:
            metrics["nonfinite"] = " and ".join(nonfinite)
            if not self.cfg.operations.skip_nonfinite_steps:
                self.logger.log(step + 1, metrics)
                raise NonFiniteError(nonfinite_message(step + 1, nonfinite))
            self.state.skipped_steps += 1
            self.logger.message(
                f"iteration {step + 1}: skipped (the {metrics['nonfinite']} is not finite; --skip-nonfinite-steps)"
            )
        elif grad_norm is not None and float(grad_norm) == 0.0 and metrics.get("loss", 0.0) > 0.0:
            self.logger.message(
                f"WARNING: iteration {step + 1}: the gradient norm is exactly 0 with loss {metrics['loss']:.4g}: every gradient "
                "vanished, the model has likely collapsed (a learning rate far too high saturates it)"
            )

    # ----------------------------------------------------------------------------- checkpoints
    def save(self) -> str:
        self.state.__dict__.update(self.reference.state())
        contents = CheckpointContents(
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            run_state=self.state.to_dict(),
            reference_chunks=self.reference.saved_chunks,
        )
        return self.saver.save(self.state.iteration, self.chunks, contents, finish=self._write_checkpoint_files)

    def _write_checkpoint_files(self, ckpt: str) -> None:
        """Rank 0, before the manifest and the marker: the tokenizer (so that a moved run directory
        keeps it), the architecture (for --load without flags and the HF export) and the resolved
        configuration (compared on resume)."""
        tokenizer = copy_tokenizer_into(self.cfg.data.tokenizer_model, os.path.join(ckpt, CHECKPOINT_TOKENIZER_DIR))
        arch = run_architecture(self.cfg, self.vocab_size, self.plan.architecture, self.tconfig.params_dtype)
        arch.tokenizer = tokenizer
        write_architecture(ckpt, arch)
        write_run_config(ckpt, self._run_record())

    # ----------------------------------------------------------------------------- the loop
    def train(self) -> None:
        cfg, first = self.cfg, self.state.iteration
        if first:
            self.logger.message(f"resumed from {self.resumed_from} at iteration {first}")
        self.logger.message(
            f"training {self.train_iters} steps | {self.feed.num_pairs} pairs, {self.feed.steps_per_epoch} steps per epoch | "
            f"TP {cfg.parallel.tensor_model_parallel_size} PP {cfg.parallel.pipeline_model_parallel_size} "
            f"DP {self.par.dp_size} | loss {cfg.loss.loss_type}, length debias {cfg.loss.length_debias}"
            + (" (no length debiasing: --length-debias sampo for SamPO)" if cfg.loss.length_debias == "none" else "")
        )
        if first >= self.train_iters:
            self.logger.message(f"nothing to do: the checkpoint is at iteration {first} of {self.train_iters} (--train-iters)")
        if self.monitor is not None and first == 0 and self.train_iters > 0:
            self.logger.log(0, self.monitor.evaluate(0))  # the starting point of the eval curves
        loop_start, exit_reason = time.monotonic(), None
        for step in range(first, self.train_iters):
            self.saver.poll()  # a background save finishes while training goes on
            metrics = self.train_step(step)
            if self.monitor is not None and self.monitor.due(step + 1):
                metrics.update(self.monitor.evaluate(step + 1))
            elapsed = time.monotonic() - loop_start
            metrics["time/elapsed_s"] = elapsed
            metrics["time/eta_s"] = elapsed / (step + 1 - first) * (self.train_iters - step - 1)
            self.logger.log(step + 1, metrics)
            interval = cfg.checkpoint.save_interval
            exit_reason = self.exits.should_exit(step + 1)
            saves = (interval and (step + 1) % interval == 0) or step + 1 == self.train_iters or exit_reason
            if cfg.checkpoint.save and saves:
                self.save()
            if exit_reason:
                self.saver.wait()
                saved = f"saved in {os.path.abspath(cfg.checkpoint.save)}" if cfg.checkpoint.save else "nothing saved (no --save)"
                self.logger.message(f"exiting after iteration {step + 1} of {self.train_iters}: {exit_reason}; {saved}")
                break
        self.saver.wait()
        self.logger.close()
        if cfg.logging.metrics_file:
            self.logger.message(f"metrics (one JSON object per step): {os.path.abspath(cfg.logging.metrics_file)}")
        if cfg.checkpoint.save:
            self.logger.message(f"checkpoints: {os.path.abspath(cfg.checkpoint.save)} (resume: run the same command again)")

    def release_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def close(self, synchronize: bool = True) -> None:
        """Close the metrics, free the run directory and destroy the process groups.

        Args:
            synchronize: wait for every rank first (off after a failure: other ranks may be gone).
        """
        if hasattr(self, "logger"):
            self.logger.close()
        for part in ("reference", "feed"):
            if hasattr(self, part):
                getattr(self, part).close()
        self.exits.restore()
        self.release_lock()
        close_distributed(barrier=synchronize)


def run(plan: RunPlan) -> None:
    """Train ``plan`` to the end; the metrics file, the run lock and the process groups are released
    whatever happens."""
    trainer = Trainer(plan)
    completed = False
    try:
        trainer.train()
        completed = True
    finally:
        trainer.close(synchronize=completed)
