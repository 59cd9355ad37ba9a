"""One training step of a tiny megatron-core GPTModel on CPU/gloo, at any TP x PP x DP.

Launched by ``tests/test_cpu_compat.py`` through torchrun. Every run starts from the same full
weights (a deterministic function of each parameter's global name, sliced to this rank's shard), so
runs at different parallel sizes are directly comparable. For each variant (``untied``, ``tied``
embedding/output weights) rank 0 writes to ``--out`` under the variant's name:

* ``losses``: the loss of each of the 2 global micro-batches;
* ``grads``: the full (TP-gathered, all PP stages) gradients after ``finalize_model_grads``
  (absent with the distributed optimizer, whose grad buffers hold only this rank's shard);
* ``weights``: the full weights after one Adam step (clip_grad > 0);
* ``grad_norm``: the norm the optimizer step reported (before clipping).

With ``--checkpoint-dir`` it also checks a fully parallel dist_checkpointing save/load round trip
and writes ``checkpoint_ok``.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sampo_megatron.compat import apply_cpu_compat, model_parallel_manual_seed
from sampo_megatron.compat.checkpoint_writer import stop_writer_manager
from sampo_megatron.models import weights
from sampo_megatron.runtime.distributed import close_distributed, init_distributed, reset_megatron_state

if TYPE_CHECKING:  # megatron is imported only after the compat check in main()
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]

SEED = 1234
VOCAB = 128
SEQ = 16
MICRO_BATCH = 2
GLOBAL_MICRO_BATCHES = 2
NUM_LAYERS = 4
HIDDEN = 64
FFN = 128
HEADS = 4
QUERY_GROUPS = 2
CLIP_GRAD = 1.0  # below the step's grad norm (~4.6), so clipping scales the grads
LR = 1e-2
ADAM_EPS = 1e-3


def parse_args() -> argparse.Namespace:
    """Parse the worker's command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--variants", default="untied,tied", help="comma-separated: untied, tied (embedding/output)")
    parser.add_argument("--checkpoint-dir", default="", help="also test a checkpoint round trip")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def full_weight(name: str, shape: torch.Size) -> torch.Tensor:
    """The full (unsharded) initial value of the parameter called ``name``.

    Seeded by the name alone, so it does not depend on the parallel layout or creation order.
    """
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen)
    if "layernorm" in name:  # RMSNorm scales: near 1 so that they get non-trivial gradients
        return 1.0 + 0.1 * noise
    return 0.05 * noise


def gather_full(local: torch.Tensor, name: str, param: torch.Tensor) -> torch.Tensor:
    """The full tensor of this rank's shard (all TP ranks take part)."""
    from megatron.core import parallel_state

    return weights.gather_full(local, name, param, parallel_state.get_tensor_model_parallel_group(), gated=True)


def make_batches() -> list[dict[str, torch.Tensor]]:
    """The global micro-batches, identical on every rank."""
    gen = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(GLOBAL_MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        loss_mask = torch.ones(MICRO_BATCH, SEQ)
        loss_mask[:, : SEQ // 4] = 0.0  # a "prompt" that is not trained on
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": loss_mask,
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
            }
        )
    return batches


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
    """Megatron forward_step_func: per-token losses from the model, masked mean in loss_func."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"]
        loss = (output_tensor.float() * mask).sum() / mask.sum()
        # The schedule divides `loss` in place by the number of micro-batches: log a clone.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def build_model(config: TransformerConfig, tied: bool) -> tuple[GPTModel, dict[str, str]]:
    """A GPTModel pipeline stage with the deterministic full weights sliced to this rank.

    Returns:
        The model and the map from its local parameter names to global (TP1/PP1) names.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
    )
    names = weights.global_param_names(model)  # tied: the last stage's output maps to the embedding
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for local_name, param in model.named_parameters():
            name = names[local_name]
            full = full_weight(name, torch.Size(weights.full_shape(param, tp_size)))
            param.copy_(weights.shard_of(full, name, param, tp_rank, tp_size, gated=True))
    return model, names


def train_one_step(
    config: TransformerConfig, tied: bool, distributed_optimizer: bool
) -> tuple[dict[str, object], DistributedDataParallel]:
    """Run one step (schedule, DDP, finalize_model_grads, Adam with clipping) of a fresh model.

    Returns:
        This rank's contribution to the result (see the module docstring) and the DDP model.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, names = build_model(config, tied)
    params = dict(model.named_parameters())
    ddp_model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
        ),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            weight_decay=0.01,
            # A large eps keeps the first Adam update a smooth function of the gradient, so that
            # fp32 rounding differences between layouts stay fp32-sized in the updated weights.
            adam_eps=ADAM_EPS,
            clip_grad=CLIP_GRAD,
            params_dtype=torch.float32,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp_model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    # This DP rank's share of the global micro-batches.
    dp_rank = parallel_state.get_data_parallel_rank()
    local_mbs = GLOBAL_MICRO_BATCHES // parallel_state.get_data_parallel_world_size()
    my_batches = make_batches()[dp_rank * local_mbs : (dp_rank + 1) * local_mbs]

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(my_batches),
        model=[ddp_model],
        num_microbatches=local_mbs,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )

    result: dict[str, object] = {}
    if not distributed_optimizer:  # its grad buffers hold valid grads only for this rank's shard
        result["grads"] = {names[n]: gather_full(p.main_grad, names[n], p) for n, p in params.items()}
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful
    result["weights"] = {names[n]: gather_full(p.data, names[n], p) for n, p in params.items()}
    result["grad_norm"] = float(grad_norm)
    # (dp rank, micro-batch losses): only the last pipeline stage has losses.
    result["losses"] = [(dp_rank, [float(d["loss"]) for d in losses])] if losses else []
    return result, ddp_model


def merge_results(gathered: list[dict[str, object]]) -> dict[str, object]:
    """Merge the per-rank results (DP replicas hold identical copies; stages hold disjoint ones)."""
    merged: dict[str, object] = {"grad_norm": gathered[0]["grad_norm"]}
    for key in ("grads", "weights"):
        if key in gathered[0]:
            merged[key] = {}
            for part in gathered:
                for name, value in part[key].items():  # type: ignore[union-attr]
                    merged[key].setdefault(name, value)  # type: ignore[union-attr]
    per_dp: dict[int, list[float]] = {}
    for part in gathered:
        for dp_rank, values in part["losses"]:  # type: ignore[union-attr]
            per_dp[dp_rank] = values
    merged["losses"] = [v for dp_rank in sorted(per_dp) for v in per_dp[dp_rank]]
    return merged


def checkpoint_round_trip(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Save with the fully parallel torch_dist strategy, scramble the weights, load, compare.

    Exercises the dist_checkpointing CPU sites (fully_parallel.py, exchange_utils.py, mapping.py).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )

    os.makedirs(ckpt_dir, exist_ok=True)
    dp_group = parallel_state.get_data_parallel_group()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    save = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir, save)
    stop_writer_manager()  # the writer's spawned Manager would outlive the save (compat/checkpoint_writer.py)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    load = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt_dir), dp_group)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir, load))
    for n, p in model.named_parameters():
        assert torch.equal(p, expected[n]), f"checkpoint round trip changed {n}"


def check_compat_is_targeted() -> None:
    """The compat layer imports megatron only when applied, is idempotent, leaves torch alone."""
    megatron_loaded = any(m == "megatron" or m.startswith("megatron.") for m in sys.modules)
    assert not megatron_loaded, "importing sampo_megatron.compat imported megatron"
    current_device, tensor_type = torch.cuda.current_device, torch.Tensor.type
    assert apply_cpu_compat() is True and apply_cpu_compat() is True
    assert torch.cuda.current_device is current_device and torch.Tensor.type is tensor_type
    assert torch.zeros(1).type() == "torch.FloatTensor"
    import megatron.core.pipeline_parallel.schedules as schedules

    assert schedules.torch is not torch and schedules.torch.zeros([]).device.type == "cpu"
    # compat/torch_compile.py: importing megatron-core created no torch.compile wrapper (the first
    # one imports TorchDynamo), and torch.compile is torch's own again
    import megatron.core.jit as jit
    import megatron.core.transformer.moe.router  # noqa: F401 (0.19 compiles a routing function here)

    assert jit.jit_fuser is jit.noop_decorator and "torch._dynamo" not in sys.modules
    assert torch.compile.__module__ == "torch" and torch.compile.__name__ == "compile"


def main() -> None:
    """Initialise gloo and megatron, run each variant, save the merged results on rank 0."""
    args = parse_args()
    # A fresh process checks that compat is targeted; on the test pool megatron-core was imported
    # before this job (tests/test_cpu_compat.py checks it in a fresh interpreter as well).
    fresh = not any(m == "megatron" or m.startswith("megatron.") for m in sys.modules)
    init_distributed()
    if fresh:
        check_compat_is_targeted()

    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    model_parallel_manual_seed(SEED)
    assert GLOBAL_MICRO_BATCHES % parallel_state.get_data_parallel_world_size() == 0

    results: dict[str, object] = {"compat_checks": True}
    for variant in args.variants.split(","):
        config = TransformerConfig(
            num_layers=NUM_LAYERS,
            hidden_size=HIDDEN,
            ffn_hidden_size=FFN,
            num_attention_heads=HEADS,
            num_query_groups=QUERY_GROUPS,
            gated_linear_unit=True,
            activation_func=F.silu,
            normalization="RMSNorm",
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
            pipeline_dtype=torch.float32,
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            batch_p2p_comm=False,  # the batched isend/irecv path is unreliable on gloo (see notes)
        )
        result, ddp_model = train_one_step(config, variant == "tied", args.distributed_optimizer)
        gathered: list[dict[str, object]] = [{}] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        results[variant] = merge_results(gathered)
        if args.checkpoint_dir and variant == "untied":
            checkpoint_round_trip(ddp_model.module, args.checkpoint_dir)
            results["checkpoint_ok"] = True

    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    reset_megatron_state()
    close_distributed()


if __name__ == "__main__":
    main()
