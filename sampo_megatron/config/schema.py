"""The run configuration's schema: one dataclass per section, one field per flag.

Every field is a flag (config/parsing.py builds the command line from them):
``tensor_model_parallel_size`` is ``--tensor-model-parallel-size``, a bool field is a switch
(``--bf16``) with a ``--no-`` form, and the attribute docstring under a field is its help. Field
names are unique across sections (they are the flags and the ``--config`` YAML keys), except
``loss.seed``, which is the run's ``--seed``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..frozen import Freezable
from ..losses.config import LossConfig


@dataclass
class ModelConfig(Freezable):
    """A decoder-only transformer (megatron-core GPTModel): Llama-style by default, GPT-NeoX with
    ``parallel_residual``, LayerNorm, GELU and ``add_bias_linear``. A converted checkpoint carries
    these fields (``sampo_model.json``), so ``--load`` sets them."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int | None = None
    """MLP width; default 4 * hidden (GELU) or the Llama rounding of 8/3 * hidden (SwiGLU)."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; default: one per attention head."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """RMSNorm or LayerNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    swiglu: bool = True
    """Gated SiLU MLP (Llama) instead of GELU."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projection (Qwen2)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate output projection instead of the transposed input embedding."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that get rotary embeddings."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the tensor-parallel size."""
    init_method_std: float = 0.02
    """Standard deviation of the random initialisation (when no checkpoint is loaded)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: local (megatron-core, CPU and GPU) or transformer_engine (GPU)."""
    local_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of the local spec: sdpa (torch's scaled_dot_product_attention; needed by
    --pack-sequences) or megatron (megatron-core's unfused DotProductAttention)."""
    vocab_size: int | None = None
    """Vocabulary of the model (embedding rows before TP padding); default: the tokenizer's size."""
    kv_channels: int | None = None
    """Dimension of each attention head; default: hidden size / attention heads."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """Activation of the non-gated MLP (--no-swiglu): gelu (erf) or gelu_tanh (tanh approximation)."""
    add_bias_linear: bool = False
    """Biases on all linear layers: QKV, attention output, both MLP layers (GPT-NeoX)."""
    parallel_residual: bool = False
    """GPT-NeoX parallel residual: x + attention(ln1(x)) + mlp(ln2(x))."""
    rope_scaling: bool = False
    """Llama 3.1 RoPE frequency scaling (low/high frequency factors 1 and 4, 8192 original positions)."""
    rope_scaling_factor: float = 8.0
    """Factor of the Llama 3.1 RoPE scaling."""
    sliding_window: int | None = None
    """Attention window of the source model (Mistral); attention here is fully causal, so
    --seq-length must not exceed it."""


@dataclass
class ParallelConfig(Freezable):
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits layers)."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual stage for the interleaved pipeline schedule."""
    context_parallel_size: int = 1
    """Context-parallel size (splits the sequence; needs Transformer Engine attention)."""
    sequence_parallel: bool = False
    """Shard layer-norm and dropout activations over the tensor-parallel group."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel group."""


@dataclass
class TrainingConfig(Freezable):
    """Batches, sequence length, run length, seed and what a micro-batch holds."""

    micro_batch_size: int = 1
    """Preference pairs per micro-batch (each pair is two sequences: chosen and rejected)."""
    global_batch_size: int = 8
    """Pairs per optimizer step = micro-batch x data-parallel size x accumulation steps."""
    seq_length: int = 128
    """Tokens per sequence (prompt + response); prompts are truncated from the left to fit."""
    train_iters: int | None = None
    """Optimizer steps to run (or give --train-epochs)."""
    train_epochs: int | None = None
    """Epochs over the data to run (or give --train-iters)."""
    seed: int = 1234
    """Seed for initialisation, data order and SamPO draws."""
    variable_seq_lengths: bool = True
    """Pad each micro-batch only to its longest sequence (rounded up to a multiple of 8, of the TP
    size with --sequence-parallel and of 2 x CP) instead of --seq-length; pipeline-parallel runs
    (PP > 1) always pad to --seq-length."""
    pack_sequences: bool | None = None
    """Lay the sequences of several whole pairs end to end in micro-batches of 2 x
    --micro-batch-size x --seq-length tokens (THD, attention confined to each sequence) instead of
    padding each sequence: the same per-pair losses with little padding (docs/packing.md). Neither
    flag: on with the local spec where packing can run, off with the Transformer Engine spec."""
    response_logits_only: bool = True
    """Project through the output layer only the positions whose target is a response token (no
    logits at prompt or padding positions)."""
    fused_logprobs: bool = False
    """Compute the response tokens' log-probs straight from the final hidden states and the output
    weight, a chunk of positions at a time (ops/fused_logprobs.py): no [n, V/TP] logits exist in
    forward or backward. Needs --response-logits-only."""
    fused_logprobs_chunk_size: int | None = None
    """Positions per chunk of --fused-logprobs; default: ~32 MiB of fp32 logits per chunk."""


@dataclass
class OptimizerConfig(Freezable):
    """AdamW (megatron-core's Adam with decoupled weight decay) and gradient clipping."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""


@dataclass
class ScheduleConfig(Freezable):
    """The learning-rate schedule: linear warm-up from 0 to --lr, then decay to --min-lr at the last step."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_fraction: float = 0.0
    """Fraction of the steps spent in linear warm-up."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up: constant, linear or cosine."""


@dataclass
class PrecisionConfig(Freezable):
    """Parameter and activation precision, policy and reference replica alike."""

    bf16: bool = False
    """bfloat16 parameters and activations with fp32 master weights."""
    fp16: bool = False
    """float16 with dynamic loss scaling."""
    fp8_format: Literal["e4m3", "hybrid"] | None = None
    """FP8 GEMMs through Transformer Engine (GPU, --transformer-impl transformer_engine, with --bf16):
    e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients). Policy and reference replica alike."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe of Transformer Engine: delayed, tensorwise (current scaling), blockwise, mxfp8
    (Blackwell)."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in BF16 under --fp8-format (not with the delayed recipe)."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in BF16 with --first-last-layers-bf16."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in BF16 with --first-last-layers-bf16."""


@dataclass
class RecomputeConfig(Freezable):
    """Activation recomputation (megatron-core's)."""

    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation: full (whole layers, with --recompute-method) or selective (core attention)."""
    recompute_method: Literal["uniform", "block"] | None = None
    """Which layers full recomputation covers: uniform (every --recompute-num-layers layers form one
    checkpointed chunk) or block (the first --recompute-num-layers layers of each pipeline stage)."""
    recompute_num_layers: int | None = None
    """Layers per recomputed chunk (uniform) or recomputed layers per pipeline stage (block)."""


@dataclass
class OperationsConfig(Freezable):
    """What a run does on a non-finite step, a signal or a time budget."""

    check_for_nan_in_loss_and_grad: bool = True
    """Stop the run, before the optimizer step and before any save, at the first step whose loss or
    gradient norm is not finite (NaN or Inf); the latest checkpoint marker keeps naming the last
    sound checkpoint."""
    skip_nonfinite_steps: bool = False
    """Instead of stopping, skip a step whose loss or gradient norm is not finite (no update, the
    learning-rate schedule does not advance); skipped steps are counted in the metric skipped_steps."""
    exit_signal_handler: bool = False
    """On SIGTERM or SIGINT, finish the current step, save a checkpoint (with --save) and exit 0;
    a second signal during the save is ignored (SLURM preemption, a job's time limit)."""
    exit_duration_in_mins: float | None = None
    """Finish the current step, save and exit 0 once the run has trained this many minutes."""
    exit_interval: int | None = None
    """Finish the step whose number is a multiple of this, save and exit 0."""


@dataclass
class DataConfig(Freezable):
    data_path: str | None = None
    """Preference data: a .jsonl, .json or .parquet file, a datasets save_to_disk directory, or the
    prefix of an indexed dataset written by tools/preprocess_preference_data.py (see docs/data.md)."""
    data_format: Literal["auto", "generic", "hh-rlhf", "ultrafeedback", "tldr"] = "auto"
    """Record layout of a raw file: generic (prompt/chosen/rejected), hh-rlhf, ultrafeedback, tldr;
    auto detects it from the first record."""
    data_split: str = "train"
    """Split to read from a datasets DatasetDict directory."""
    prompt_template: Literal["auto", "tokenizer", "llama3", "tulu", "chatml", "plain"] = "auto"
    """How prompts become text: the tokenizer's own chat template (tokenizer), llama3, tulu, chatml or
    plain; auto: the tokenizer's template if it has one, else plain."""
    on_bad_record: Literal["error", "skip"] = "error"
    """error: stop at the first bad record, naming file, line and field; skip: drop bad records and
    report the counts by reason."""
    min_response_tokens: int = 1
    """A pair whose responses cannot keep this many tokens (or all of a shorter one) next to the
    prompt's protected part (BOS + chat header) within --seq-length is a bad record."""
    tokenizer_model: str | None = None
    """Hugging Face tokenizer directory or sentencepiece .model file."""
    tokenizer_type: Literal["auto", "huggingface", "sentencepiece"] = "auto"
    """auto, huggingface or sentencepiece."""


@dataclass
class ReferenceConfig(Freezable):
    ref_mode: Literal["replica", "cache"] = "replica"
    """replica: a frozen copy of the policy runs forward each step; cache: per-token reference
    log-probs are computed once per epoch and read from disk."""
    ref_update: Literal["none", "epoch"] = "none"
    """none, or epoch: copy the policy into the reference at every epoch boundary (Iterative SamPO)."""
    ref_load: str | None = None
    """Checkpoint of the reference model; default: the policy's starting point."""
    ref_cache_dir: str | None = None
    """Where --ref-mode cache stores reference log-probs; default: <save>/ref_cache."""


@dataclass
class CheckpointConfig(Freezable):
    load: str | None = None
    """Checkpoint directory to start from (a converted model or a run's --save directory)."""
    save: str | None = None
    """Directory for iter_XXXXXXX/ checkpoints and latest_checkpointed_iteration.txt."""
    save_interval: int | None = None
    """Save every N steps (and at the end)."""
    keep_last: int | None = None
    """Keep only the N newest complete checkpoints of --save: older ones are deleted once a newer one
    is complete (the one the marker names is never deleted)."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core's asynchronous torch_dist save): training
    continues while a forked process writes; the manifest and the marker follow once every rank's
    write is complete, and a run waits for its last save before it exits."""
    finetune: bool = False
    """Load only the model weights from --load (new optimizer, schedule and data position)."""
    override_opt_param_scheduler: bool = False
    """On resume, take the learning-rate schedule and optimizer hyper-parameters (--lr, --min-lr,
    --lr-decay-style, --lr-warmup-fraction, --train-iters, --weight-decay, Adam's, --clip-grad) from
    this run's flags instead of refusing a change from the checkpoint's."""
    verify_checkpoint: bool = True
    """Check a checkpoint's files against its manifest (size and SHA-256) before loading it."""
    checkpoint_fallback: bool = True
    """When the latest checkpoint of a run directory is damaged, load the newest older one that
    verifies (loudly) instead of stopping."""
    trust_checkpoint: bool = False
    """Skip the allow-list check of the pickles in a torch_dist checkpoint (.metadata and non-tensor
    items): only for checkpoints from a source you trust (docs/checkpoints.md)."""


@dataclass
class LoggingConfig(Freezable):
    log_interval: int = 1
    """Print a metrics line every N steps."""
    metrics_file: str | None = None
    """One JSON object per step. A fresh run moves an existing file aside (FILE.1, FILE.2, ...); a
    resumed run keeps its lines up to the resumed iteration and continues it."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here."""
    wandb_project: str | None = None
    """Log every step's metrics to this Weights & Biases project (the logging rank; needs
    pip install 'sampo-megatron[wandb]'; WANDB_MODE=offline without network)."""
    wandb_exp_name: str | None = None
    """The W&B run's name."""
    wandb_save_dir: str | None = None
    """Where W&B writes its files; when not set, <--save>/wandb (else ./wandb), as in Megatron-LM."""


@dataclass
class EvalConfig(Freezable):
    """The verbosity monitor (training/monitor.py): the policy's own response lengths and held-out
    implicit rewards, logged as eval/* metrics."""

    eval_interval: int | None = None
    """Evaluate every N steps (and before the first step of a fresh run); needs --eval-prompts and/or
    --eval-data-path."""
    eval_prompts: str | None = None
    """Prompts the policy answers at each evaluation (.jsonl with a 'prompt' field, or one per line):
    logs eval/length_mean, eval/length_median, eval/eos_fraction."""
    eval_data_path: str | None = None
    """Held-out preference pairs (read like --data-path): logs eval/rewards/* (debiased) and
    eval/rewards_full/* (whole responses)."""
    eval_max_new_tokens: int = 64
    """Tokens generated at most per eval prompt."""
    eval_temperature: float = 0.0
    """0: greedy eval generations; > 0: sampled at this temperature (seeded with --seed)."""
    eval_top_p: float = 1.0
    """Nucleus mass of sampled eval generations."""
    eval_batch_size: int = 32
    """Eval prompts decoded together."""
    eval_output: str | None = None
    """Append every eval generation (iteration, prompt, response, num_tokens) to this JSONL file."""
    eval_rewards_output: str | None = None
    """Append every held-out pair's implicit rewards at each evaluation to this JSONL file
    (iteration, index, the pair's response lengths, chosen / rejected / margin debiased and whole):
    the data behind eval/*/margin_length_corr, for a binned margin-vs-length plot."""


@dataclass
class PlanConfig(Freezable):
    dry_run: bool = False
    """Validate the layout and print the per-GPU memory plan (tools/plan_memory.py), then exit before
    building anything; needs no GPU."""
    world_size: int | None = None
    """GPUs of the run for --dry-run; default: the launcher's WORLD_SIZE / SLURM_NTASKS / MPI size, else 1."""
    gpu_memory_gib: float = 80.0
    """GPU memory the --dry-run plan must fit (GiB)."""


@dataclass
class RunConfig(Freezable):
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    explicit_flags: frozenset[str] | None = None
    """The fields the user set (command line or --config); None when the configuration was built in
    code. A checkpoint's architecture fills only the others, and one that disagrees with a set flag
    is an error (models/architecture.py)."""

    def to_dict(self) -> dict:
        """Every section's fields (the flags); ``explicit_flags`` is not one."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_TYPES}


SECTION_TYPES = {
    f.name: f.default_factory for f in dataclasses.fields(RunConfig) if f.default_factory is not dataclasses.MISSING
}
"""Section name -> its dataclass, in ``RunConfig``'s order."""
SHARED_FIELDS = {("loss", "seed"): ("training", "seed")}
"""Fields that are another section's flag: LossConfig's seed is the run's --seed."""

TRAINING_SPLIT = {
    name: section
    for section in ("optimizer", "schedule", "precision", "recompute", "operations")
    for name in (f.name for f in dataclasses.fields(SECTION_TYPES[section]))
}
"""Fields that were ``training`` fields before the configuration was split into sections -> their
section now (a ``run_config.json`` written before the split is read with these moved)."""
