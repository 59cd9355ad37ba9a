"""The SamPO / DPO training loop on megatron-core: wires data, models, reference, optimizer,
schedule, checkpoints and metrics together."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data import DataOptions, PairBatches, PairDataset, load_pairs, load_tokenizer
from ..data.tokenizer import copy_tokenizer_into
from ..losses import LOSSES, RunningMean
from ..models.architecture import adopt_architecture, run_architecture, write_architecture
from ..models.gpt import build_model_chunks, check_fp8_available, model_vocab_sizes, transformer_config
from ..models.response_logits import install_output_selection
from ..models.weights import initialize_deterministically
from .checkpointing import (
    CheckpointContents,
    check_optimizer_state,
    has_key,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    select_checkpoint,
)
from .launch_env import apply_launch_env
from .metrics import MetricsLogger
from .monitor import VerbosityMonitor
from .nonfinite import NonFiniteError, nonfinite_message, nonfinite_parts
from .reference import ReferenceCache, copy_weights, forward_only_logps
from .run_config import check_resume, data_fingerprint, format_config, read_run_config, resolved_record, write_run_config
from .run_lock import RunLock, RunLockError
from .step import StepContext, policy_forward_step

# The tokenizer travels with every checkpoint, here (models/architecture.py stores the path relative).
CHECKPOINT_TOKENIZER_DIR = "tokenizer"


@dataclass
class RunState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""

    iteration: int = 0
    """Optimizer steps completed."""
    reference_source: dict = field(default_factory=dict)
    reference_version: int = 0
    """Epoch at which the reference was last set (Iterative: the current epoch)."""
    reward_mean: dict = field(default_factory=lambda: {"total": 0.0, "count": 0})
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient (--skip-nonfinite-steps)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _init_distributed() -> None:
    if dist.is_initialized():
        return
    apply_launch_env()  # srun / mpirun / a plain python start: RANK, WORLD_SIZE, MASTER_ADDR, ... (launch_env.py)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class Trainer:
    """Builds everything from a :class:`RunConfig`; :meth:`train` runs the loop."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._adopt_checkpoint_architecture()
        check_fp8_available(cfg.model, cfg.training)
        _init_distributed()
        from ..compat import apply_cpu_compat

        apply_cpu_compat()
        from megatron.core import parallel_state, tensor_parallel

        par, tr = cfg.parallel, cfg.training
        self.tconfig = transformer_config(cfg.model, par, tr)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.tconfig.virtual_pipeline_model_parallel_size,
            context_parallel_size=par.context_parallel_size,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(tr.seed)
        torch.manual_seed(tr.seed)
        self.ps = parallel_state
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.writes_results = (
            self.is_last_stage
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
        )
        self.logs = self.writes_results and self.dp_rank == 0

        self.run_lock = self._lock_save_dir()
        try:
            self._set_up()
        except BaseException:
            self.release_lock()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        from megatron.core import parallel_state

        self._check_config()
        self._build_data()
        if dist.get_rank() == 0:
            print(format_config(cfg), flush=True)
        self._build_models()
        self._build_optimizer()
        self.state = RunState()
        self.reward_mean = RunningMean(group=parallel_state.get_data_parallel_group())
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.ctx = StepContext(
            loss=cfg.loss,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            vocab_size=self.vocab_size,
            reward_mean=self.reward_mean,
            cp_group=parallel_state.get_context_parallel_group() if self.cp_size > 1 else None,
            response_logits_only=cfg.training.response_logits_only,
        )
        self._load_or_init()
        self.logger = MetricsLogger(
            self.logs, self.train_iters, cfg.logging.log_interval, cfg.logging.metrics_file, cfg.logging.tensorboard_dir
        )
        self.monitor = VerbosityMonitor(self) if cfg.eval.eval_interval else None

    # ----------------------------------------------------------------------------- set-up
    def _lock_save_dir(self) -> RunLock | None:
        """Global rank 0 takes the --save directory's lock (training/run_lock.py); every rank gets
        its outcome, so that all of them stop together when another run holds it."""
        save = self.cfg.checkpoint.save
        if not save:
            return None
        lock, outcome = None, [None, None]
        if dist.get_rank() == 0:
            lock = RunLock(save)
            try:
                outcome = [None, lock.acquire()]
            except RunLockError as err:
                outcome = [str(err), None]
        dist.broadcast_object_list(outcome, src=0)
        error, note = outcome
        if error is not None:
            raise RunLockError(error)
        if note and dist.get_rank() == 0:
            print(note, flush=True)
        return lock

    def release_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _message(self, text: str) -> None:
        if dist.get_rank() == 0:
            print(text, flush=True)

    def _adopt_checkpoint_architecture(self) -> None:
        """A checkpoint with ``sampo_model.json`` (converted, or saved by this trainer) sets the model
        architecture and, unless given, the tokenizer: no architecture flags to repeat."""
        cfg = self.cfg
        paths = {"--save": cfg.checkpoint.save, "--load": cfg.checkpoint.load, "--ref-load": cfg.reference.ref_load}
        sources = {flag: resolve_checkpoint(path) for flag, path in paths.items() if path and os.path.isdir(path)}
        self.architecture = adopt_architecture(cfg.model, getattr(cfg, "explicit_flags", None), sources)
        if self.architecture is not None and cfg.data.tokenizer_model is None:
            cfg.data.tokenizer_model = self.architecture.tokenizer

    def _check_config(self) -> None:
        cfg = self.cfg
        if cfg.data.data_path is None or cfg.data.tokenizer_model is None:
            raise ValueError("--data-path and --tokenizer-model are required")
        if LOSSES[cfg.loss.loss_type].needs_token_kl:
            raise ValueError(f"--loss-type {cfg.loss.loss_type} (TDPO) is not supported by the trainer yet")
        cp = cfg.parallel.context_parallel_size
        if cp > 1 and cfg.model.transformer_impl != "transformer_engine":
            raise ValueError("--context-parallel-size > 1 needs --transformer-impl transformer_engine (megatron-core CP)")
        if cfg.training.seq_length % (2 * cp):
            raise ValueError(f"--seq-length {cfg.training.seq_length} must be divisible by 2 x --context-parallel-size {cp}")
        if cfg.reference.ref_mode == "cache" and cfg.reference.ref_cache_dir is None and cfg.checkpoint.save is None:
            raise ValueError("--ref-mode cache needs --ref-cache-dir or --save (the cache goes to <save>/ref_cache)")
        if cfg.training.train_iters is None and cfg.training.train_epochs is None:
            raise ValueError("give --train-iters or --train-epochs")

    def _build_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        self._check_tokenizer_matches_checkpoint()
        try:  # a tokenizer bigger than the model is a set-up error: say so before reading any data
            model_vocab, _ = model_vocab_sizes(cfg.model, self.tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
        except ValueError as e:
            raise ValueError(f"--tokenizer-model {cfg.data.tokenizer_model}: {e}") from None
        d = cfg.data
        options = DataOptions(
            cfg.training.seq_length, d.data_format, d.prompt_template, d.on_bad_record, d.min_response_tokens,
            d.data_split, model_vocab_size=model_vocab,
        )  # fmt: skip
        pairs, bad_records, source = load_pairs(d.data_path, self.tokenizer, options)
        if dist.get_rank() == 0:
            print(f"data: {source}\ndata: {bad_records.summary(len(pairs))}", flush=True)
        # What a resume compares besides the flags (training/run_config.py).
        self.derived = {
            "num_pairs": len(pairs),
            "data_fingerprint": data_fingerprint(pairs),
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
        }
        self.batches = PairBatches(
            PairDataset(pairs, cfg.training.seed), cfg.training.global_batch_size, cfg.training.seq_length,
            self.tokenizer.pad_id, pad_to_multiple_of=self._pad_multiple(),
        )  # fmt: skip
        self.num_pairs = len(pairs)
        tr = cfg.training
        self.train_iters = tr.train_iters if tr.train_iters is not None else tr.train_epochs * self.batches.steps_per_epoch
        mbs_dp = tr.micro_batch_size * self.dp_size
        if tr.global_batch_size % mbs_dp:
            raise ValueError(
                f"--global-batch-size {tr.global_batch_size} is not divisible by --micro-batch-size {tr.micro_batch_size} "
                f"x data-parallel size {self.dp_size}"
            )

    def _check_tokenizer_matches_checkpoint(self) -> None:
        """A --tokenizer-model given next to a checkpoint that carries its own tokenizer must be the
        same tokenizer (same ids); a different one is an error naming both."""
        arch, cfg = self.architecture, self.cfg
        if arch is None or arch.tokenizer is None or os.path.abspath(arch.tokenizer) == os.path.abspath(cfg.data.tokenizer_model):
            return
        if not os.path.exists(arch.tokenizer):
            self._message(f"note: the checkpoint names tokenizer {arch.tokenizer}, which does not exist; using --tokenizer-model {cfg.data.tokenizer_model}")
            return
        own = load_tokenizer(arch.tokenizer, cfg.data.tokenizer_type)
        if own.fingerprint() != self.tokenizer.fingerprint():
            raise ValueError(
                f"--tokenizer-model {cfg.data.tokenizer_model} is not the tokenizer of the checkpoint ({arch.tokenizer}): "
                f"their ids differ (fingerprints {self.tokenizer.fingerprint()} and {own.fingerprint()}). Leave the flag "
                "out to use the checkpoint's own tokenizer."
            )

    def _pad_multiple(self) -> int | None:
        """Micro-batch widths with --variable-seq-lengths: a multiple of 8, of TP under sequence
        parallelism (the sequence is split over TP) and of 2 x CP (megatron's load-balanced CP split);
        None (always --seq-length) with pipeline parallelism, whose schedule sends fixed shapes."""
        cfg = self.cfg
        if not cfg.training.variable_seq_lengths or cfg.parallel.pipeline_model_parallel_size > 1:
            return None
        multiple = math.lcm(8, 2 * cfg.parallel.context_parallel_size)
        if cfg.parallel.sequence_parallel:
            multiple = math.lcm(multiple, cfg.parallel.tensor_model_parallel_size)
        return multiple

    def _build_models(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        cfg = self.cfg
        self.vocab_size, self.vocab_padded = model_vocab_sizes(cfg.model, self.tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
        self.chunks = build_model_chunks(cfg.model, self.tconfig, self.vocab_padded, cfg.training.seq_length)
        for chunk in self.chunks:
            install_output_selection(chunk)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(self.chunks)
        ]
        self.reference = None
        # A reference-free loss (SimPO, SFT) never reads reference log-probs: no replica to run.
        if cfg.reference.ref_mode == "replica" and not LOSSES[cfg.loss.loss_type].reference_free:
            self.reference = self._new_reference_chunks()
        self.cache = None
        if cfg.reference.ref_mode == "cache":
            cache_dir = cfg.reference.ref_cache_dir or os.path.join(cfg.checkpoint.save, "ref_cache")
            self.cache = ReferenceCache(cache_dir, self.num_pairs, cfg.training.seq_length)

    def _new_reference_chunks(self) -> list:
        cfg = self.cfg
        ref_config = transformer_config(cfg.model, cfg.parallel, cfg.training)
        chunks = build_model_chunks(cfg.model, ref_config, self.vocab_padded, cfg.training.seq_length)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
            install_output_selection(chunk)
        return chunks

    def _build_optimizer(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        tr, par = self.cfg.training, self.cfg.parallel
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=tr.lr,
                min_lr=tr.min_lr,
                weight_decay=tr.weight_decay,
                adam_beta1=tr.adam_beta1,
                adam_beta2=tr.adam_beta2,
                adam_eps=tr.adam_eps,
                clip_grad=tr.clip_grad,
                bf16=tr.bf16,
                fp16=tr.fp16,
                params_dtype=self.tconfig.params_dtype,
                use_distributed_optimizer=par.use_distributed_optimizer,
            ),
            self.model,
        )
        warmup = int(tr.lr_warmup_fraction * self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=tr.lr,
            min_lr=tr.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=self.train_iters,
            lr_decay_style=tr.lr_decay_style,
            start_wd=tr.weight_decay,
            end_wd=tr.weight_decay,
            wd_incr_steps=self.train_iters,
            wd_incr_style="constant",
            # Megatron's pair: the checkpoint's schedule wins, unless --override-opt-param-scheduler.
            use_checkpoint_opt_param_scheduler=not self.cfg.checkpoint.override_opt_param_scheduler,
            override_opt_param_scheduler=self.cfg.checkpoint.override_opt_param_scheduler,
        )
        self.tconfig.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.grad_scale_func = self.optimizer.scale_loss

    def _contents(self, with_optimizer: bool, with_reference: bool) -> CheckpointContents:
        return CheckpointContents(
            optimizer=self.optimizer if with_optimizer else None,
            scheduler=self.scheduler,
            run_state=self.state.to_dict(),
            reference_chunks=self.reference if with_reference else None,
        )

    def _load_or_init(self) -> None:
        cfg = self.cfg
        ckpt = None
        resuming = False
        # A run resumes from its own --save directory when that holds a checkpoint.
        for candidate in (cfg.checkpoint.save, cfg.checkpoint.load):
            if candidate and (ckpt := self._select(candidate)) is not None:
                resuming = candidate == cfg.checkpoint.save or (not cfg.checkpoint.finetune and has_key(ckpt, "run_state"))
                break
        if ckpt is None and cfg.checkpoint.load:
            raise FileNotFoundError(f"--load {cfg.checkpoint.load}: no checkpoint there")
        dp_group = self.ps.get_data_parallel_group(with_context_parallel=True)

        if ckpt is None:
            initialize_deterministically(self.chunks, seed=cfg.training.seed, vocab_size=self.vocab_size)
            self.state.reference_source = {"kind": "init", "seed": cfg.training.seed}
        elif not resuming:
            load_checkpoint(ckpt, self.chunks, CheckpointContents(), dp_group)
            self.state.reference_source = {"kind": "checkpoint", "path": os.path.abspath(ckpt)}
        else:
            tr = cfg.training
            for line in check_resume(read_run_config(ckpt), self._run_record(), ckpt, cfg.checkpoint.override_opt_param_scheduler):
                self._message(line)
            check_optimizer_state(ckpt, cfg.parallel.use_distributed_optimizer, tr.bf16 or tr.fp16)
            common = load_checkpoint(ckpt, self.chunks, CheckpointContents(optimizer=self.optimizer), dp_group)
            self.state = RunState(**common["run_state"])
            self.scheduler.load_state_dict(common["scheduler"])
            if cfg.checkpoint.override_opt_param_scheduler:
                self._apply_optimizer_flags()
            self.reward_mean.load_state_dict(self.state.reward_mean)
            self._resumed_from = ckpt
        if not resuming:
            # Mixed-precision and distributed optimizers hold fp32 main copies made at construction.
            self.optimizer.reload_model_params()
        if cfg.reference.ref_load:
            self.state.reference_source = (
                {"kind": "checkpoint", "path": os.path.abspath(resolve_checkpoint(cfg.reference.ref_load) or cfg.reference.ref_load)}
                if self.state.reference_source.get("kind") != "saved"
                else self.state.reference_source
            )
        if self.reference is not None:
            self._materialise_reference(self.reference, ckpt if resuming else None)

    def _select(self, path: str) -> str | None:
        """The checkpoint to load from ``path``, verified (training/checkpointing.py)."""
        c = self.cfg.checkpoint
        return select_checkpoint(path, c.verify_checkpoint, c.checkpoint_fallback, c.trust_checkpoint, log=self._message)

    def _run_record(self) -> dict:
        record = resolved_record(self.cfg, self.derived)
        record["config"]["model"]["vocab_size"] = self.vocab_size  # as the saved architecture says
        return record

    def _apply_optimizer_flags(self) -> None:
        """--override-opt-param-scheduler: Adam's hyper-parameters from the flags, not the checkpoint's
        param groups (the scheduler sets learning rate and weight decay at every step)."""
        tr = self.cfg.training
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (tr.adam_beta1, tr.adam_beta2)
            if "eps" in group:
                group["eps"] = tr.adam_eps

    def _materialise_reference(self, chunks, resume_ckpt: str | None) -> None:
        """Give the replica the weights its recorded source says."""
        source = self.state.reference_source
        dp_group = self.ps.get_data_parallel_group(with_context_parallel=True)
        if source["kind"] == "saved":
            if resume_ckpt is None:
                raise RuntimeError("the reference was saved with a checkpoint, but no checkpoint is being resumed")
            load_checkpoint(resume_ckpt, [], CheckpointContents(reference_chunks=chunks), dp_group)
        elif source["kind"] == "checkpoint":
            load_checkpoint(self._select(source["path"]), chunks, CheckpointContents(), dp_group)
        elif source["kind"] == "init":
            initialize_deterministically(chunks, seed=source["seed"], vocab_size=self.vocab_size)
        else:
            raise ValueError(f"unknown reference source {source}")

    # ----------------------------------------------------------------------------- reference
    def _epoch_started(self, epoch: int, step: int) -> None:
        """Iterative SamPO: at each new epoch the reference becomes the current policy."""
        if self.cfg.reference.ref_update == "epoch" and epoch > self.state.reference_version:
            self.state.reference_version = epoch
            self.state.reference_source = {"kind": "saved"} if self.reference is not None else {"kind": "policy"}
            if self.reference is not None:
                copy_weights(self.model, self.reference)
            self.logger.message(f"epoch {epoch}: reference updated to the current policy")
        if self.cache is not None and not self.cache.is_complete(self.state.reference_version):
            self._build_cache(epoch, step)

    def _build_cache(self, epoch: int, step: int) -> None:
        version = self.state.reference_version
        if self.cfg.reference.ref_update == "epoch" and version > 0:
            if step != epoch * self.batches.steps_per_epoch:
                raise RuntimeError(
                    f"the reference cache of epoch {version} is missing; an Iterative run's reference (the "
                    "policy at the epoch's start) cannot be rebuilt mid-epoch"
                )
            chunks, temporary = self.model, False  # the reference is the policy as of now
        else:
            chunks, temporary = self._new_reference_chunks(), True
            self._materialise_reference(chunks, None)
        self.logger.message(f"computing reference log-probs for the cache (version {version}) ...")
        spe = self.batches.steps_per_epoch
        steps = (self._micro_batches(step)[1] for step in range(epoch * spe, (epoch + 1) * spe))

        def compute(micro_batches):
            out = forward_only_logps(chunks, micro_batches, self.ctx, self.cfg.training.seq_length)
            return out if self.writes_results else None

        self.cache.build(version, steps, compute)
        if temporary:
            del chunks

    def _attach_reference(self, micro_batches: list[dict]) -> None:
        if self.cache is not None:
            if self.is_last_stage:
                for batch in micro_batches:
                    ref_logps = self.cache.lookup(self.state.reference_version, batch["sample_ids"], batch["width"])
                    ref_logps = ref_logps.to(batch["tokens"].device)
                    if self.cp_size > 1:
                        from megatron.core.utils import get_batch_on_this_cp_rank

                        ref_logps = get_batch_on_this_cp_rank({"ref_logps": ref_logps})["ref_logps"]
                    batch["ref_logps"] = ref_logps
            return
        if self.reference is None:
            return
        outputs = forward_only_logps(self.reference, micro_batches, self.ctx, self.cfg.training.seq_length)
        if outputs is not None:
            for batch, logps in zip(micro_batches, outputs):
                batch["ref_logps"] = logps

    # ----------------------------------------------------------------------------- loop
    def _micro_batches(self, step: int) -> tuple[int, list[dict]]:
        epoch, micro_batches = self.batches.micro_batches(step, self.dp_rank, self.dp_size, self.cfg.training.micro_batch_size)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        for batch in micro_batches:
            for key, value in batch.items():
                batch[key] = value.to(device)
            batch["epoch"] = epoch
            batch["width"] = batch["tokens"].shape[1]  # before any CP slicing (cache lookups)
            if self.cp_size > 1:
                self._slice_for_context_parallel(batch)
        return epoch, micro_batches

    def _slice_for_context_parallel(self, batch: dict) -> None:
        """Keep this CP rank's part of the sequence (megatron-core's load-balanced 2 x CP split);
        positions inside each response are numbered over the whole sequence first, so the
        down-sampling draw and the sums over CP ranks see the full responses."""
        from megatron.core.utils import get_batch_on_this_cp_rank

        mask = batch["response_mask"]
        batch["response_index"] = torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)
        keys = ("tokens", "labels", "position_ids", "response_mask", "response_index")
        batch.update(get_batch_on_this_cp_rank({k: batch[k] for k in keys}))

    def _reduce_metrics(self, losses_reduced: list[dict]) -> dict[str, float]:
        if not self.is_last_stage:
            return {}
        names = sorted(losses_reduced[0]["sums"])
        totals = torch.zeros(len(names) + 1, dtype=torch.float64)
        for out in losses_reduced:
            totals[:-1] += torch.stack([out["sums"][n].cpu() for n in names])
            totals[-1] += out["pairs"]
        dist.all_reduce(totals, group=self.ps.get_data_parallel_group())
        return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}

    def train_step(self, step: int) -> dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        start = time.perf_counter()
        epoch, micro_batches = self._micro_batches(step)
        self._epoch_started(epoch, step)
        self._attach_reference(micro_batches)
        reward_mean_before = self.reward_mean.state_dict()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(micro_batches) for _ in self.model]
        losses_reduced = get_forward_backward_func()(
            forward_step_func=partial(policy_forward_step, self.ctx),
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=self.cfg.training.seq_length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=False,
        )
        lr = self.optimizer.param_groups[0]["lr"]
        nonfinite = []
        if self.cfg.training.check_for_nan_in_loss_and_grad:
            local = [float(v) for out in losses_reduced for v in out["sums"].values()] if self.is_last_stage else []
            nonfinite = nonfinite_parts(step + 1, self.model, local)
        if nonfinite:
            update_successful, grad_norm = False, None
            self.reward_mean.load_state_dict(reward_mean_before)  # the step never happened
        else:
            update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        elapsed = time.perf_counter() - start
        metrics = self._reduce_metrics(losses_reduced)
        if nonfinite:
            metrics["nonfinite"] = " and ".join(nonfinite)
            if not self.cfg.training.skip_nonfinite_steps:
                self.logger.log(step + 1, metrics)
                raise NonFiniteError(nonfinite_message(step + 1, nonfinite))
            self.state.skipped_steps += 1
            self.logger.message(f"iteration {step + 1}: skipped (the {metrics['nonfinite']} is not finite; --skip-nonfinite-steps)")
        elif grad_norm is not None and float(grad_norm) == 0.0 and metrics.get("loss", 0.0) > 0.0:
            self.logger.message(
                f"WARNING: iteration {step + 1}: the gradient norm is exactly 0 with loss {metrics['loss']:.4g}: every gradient "
                "vanished, the model has likely collapsed (a learning rate far too high saturates it)"
            )
        _, pairs = self.batches.batch_at(step)
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        metrics.update(
            epoch=float(epoch),
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            skipped_steps=float(self.state.skipped_steps),
            pairs_per_s=len(pairs) / elapsed,
            tokens_per_s=tokens / elapsed,
            step_time_s=elapsed,
            peak_memory_gib=_peak_memory_gib(),
        )
        self.state.iteration = step + 1
        self.state.reward_mean = self.reward_mean.state_dict()
        return metrics

    def save(self) -> str:
        with_reference = self.reference is not None and self.state.reference_source.get("kind") == "saved"
        ckpt = save_checkpoint(
            self.cfg.checkpoint.save,
            self.state.iteration,
            self.chunks,
            self._contents(with_optimizer=True, with_reference=with_reference),
            self.ps.get_data_parallel_group(with_context_parallel=True),
            # the architecture, for --load without flags and for the HF export
            finish=self._write_checkpoint_files,
        )
        self.logger.message(f"saved checkpoint {ckpt}")
        return ckpt

    def _write_checkpoint_files(self, ckpt: str) -> None:
        """Rank 0, before the manifest and the marker: the tokenizer (so that a moved run directory
        keeps it), the architecture (for --load without flags and the HF export) and the resolved
        configuration (compared on resume)."""
        tokenizer = copy_tokenizer_into(self.cfg.data.tokenizer_model, os.path.join(ckpt, CHECKPOINT_TOKENIZER_DIR))
        arch = run_architecture(self.cfg, self.vocab_size, self.architecture, self.tconfig.params_dtype)
        arch.tokenizer = tokenizer
        write_architecture(ckpt, arch)
        write_run_config(ckpt, self._run_record())

    def train(self) -> None:
        cfg = self.cfg
        start = self.state.iteration
        if start:
            self.logger.message(f"resumed from {self._resumed_from} at iteration {start}")
        self.logger.message(
            f"training {self.train_iters} steps | {self.num_pairs} pairs, {self.batches.steps_per_epoch} steps per epoch | "
            f"TP {cfg.parallel.tensor_model_parallel_size} PP {cfg.parallel.pipeline_model_parallel_size} "
            f"DP {self.dp_size} | loss {cfg.loss.loss_type}, length debias {cfg.loss.length_debias}"
        )
        if start >= self.train_iters:
            self.logger.message(f"nothing to do: the checkpoint is at iteration {start} of {self.train_iters} (--train-iters)")
        if self.monitor is not None and start == 0 and self.train_iters > 0:
            self.logger.log(0, self.monitor.evaluate(0))  # the starting point of the eval curves
        for step in range(start, self.train_iters):
            metrics = self.train_step(step)
            if self.monitor is not None and self.monitor.due(step + 1):
                metrics.update(self.monitor.evaluate(step + 1))
            self.logger.log(step + 1, metrics)
            interval = cfg.checkpoint.save_interval
            if cfg.checkpoint.save and ((interval and (step + 1) % interval == 0) or step + 1 == self.train_iters):
                self.save()
        self.logger.close()
        if cfg.logging.metrics_file:
            self.logger.message(f"metrics (one JSON object per step): {os.path.abspath(cfg.logging.metrics_file)}")
        if cfg.checkpoint.save:
            self.logger.message(f"checkpoints: {os.path.abspath(cfg.checkpoint.save)} (resume: run the same command again)")

    def close(self) -> None:
        """Destroy the process groups. Left to interpreter exit, gloo's communication threads can
        still be joinable when their destructors run, and the process aborts ('terminate called
        without an active exception') after a successful run."""
        self.logger.close()
        if dist.is_initialized():
            dist.barrier()
        self.release_lock()
        if dist.is_initialized():
            self.ps.destroy_model_parallel()
            dist.destroy_process_group()
