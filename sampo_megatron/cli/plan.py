"""Per-GPU memory of a SamPO / DPO run, by part, and whether it fits a GPU (no GPU needed).

    python tools/plan_memory.py --model llama3-8b --tensor-model-parallel-size 2 --world-size 8 \\
        --seq-length 8192 --bf16 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    python tools/plan_memory.py --model qwen1.5-72b --search --nodes 8 --gpus-per-node 8 --bf16 --fp8-format hybrid
    python tools/plan_memory.py --model /path/to/hf_model/config.json ...

``--model``: a preset (pythia-2.8b, llama3-8b, tulu2-13b, qwen1.5-72b) or a Hugging Face
``config.json`` (or its directory). The same plan is what ``pretrain_sampo.py --dry-run`` prints.
What each part counts: docs/memory.md.
"""

import argparse
import sys

from sampo_megatron.planning import (
    PRESETS,
    Layout,
    LayoutError,
    check_layout,
    format_plan,
    load_shape,
    plan_memory,
    search_layouts,
)
from sampo_megatron.planning.memory import GIB
from sampo_megatron.planning.shapes import TOKEN_KL_LOSSES, attention_kind


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}) or a Hugging Face config.json / directory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--world-size", type=int, default=None, help="GPUs in all; default --nodes x --gpus-per-node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch (2 sequences each)")
    p.add_argument("--global-batch-size", type=int, default=None, help="pairs per step; default micro-batch x DP")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    p.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    p.add_argument("--recompute-num-layers", type=int, default=None)
    p.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)
    p.add_argument("--first-last-layers-bf16", action="store_true")
    p.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    p.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="16-bit weights (else fp32)")
    p.add_argument("--ref-mode", choices=["replica", "cache"], default="replica")
    p.add_argument("--fused-logprobs", action="store_true", help="log-probs from the hidden states, no logits (as the trainer's flag)")
    p.add_argument("--loss-type", default="sigmoid",
                   help=f"the run's loss; {' and '.join(TOKEN_KL_LOSSES)} (TDPO) keep the reference's hidden states and logits")  # fmt: skip
    p.add_argument(
        "--transformer-impl",
        choices=["transformer_engine", "local"],
        default="transformer_engine",
        help="layer implementation; attention keeps no softmax output except with --local-attention megatron",
    )
    p.add_argument("--local-attention", choices=["sdpa", "megatron"], default="sdpa",
                   help="core attention of the local spec: sdpa (fused) or megatron (unfused, keeps the softmax)")  # fmt: skip
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    p.add_argument("--search", action="store_true", help="list the layouts of --world-size GPUs that fit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shape = load_shape(args.model)
    world = args.world_size or args.nodes * args.gpus_per_node
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    dp = max(1, world // (tp * pp * cp))
    vpp = 1
    if args.num_layers_per_virtual_pipeline_stage:
        vpp = max(1, shape.num_layers // pp // args.num_layers_per_virtual_pipeline_stage)
    layout = Layout(
        tp=tp, pp=pp, vpp=vpp, dp=dp, cp=cp, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size or args.micro_batch_size * dp, seq_length=args.seq_length,
        sequence_parallel=args.sequence_parallel, distributed_optimizer=args.use_distributed_optimizer,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, fp8=args.fp8_format,
        bf16_layers=args.num_layers_at_start_in_bf16 + args.num_layers_at_end_in_bf16 if args.first_last_layers_bf16 else 0,
        param_bytes=2 if args.bf16 else 4, ref_mode=args.ref_mode, token_kl=args.loss_type in TOKEN_KL_LOSSES,
        attention=attention_kind(args.transformer_impl, args.local_attention), fused_logprobs=args.fused_logprobs,
    )  # fmt: skip
    if args.search:
        plans = search_layouts(shape, layout, world, min(args.gpus_per_node, world), args.gpu_memory_gib)
        if not plans:
            print(
                f"no layout of {world} GPUs fits {args.gpu_memory_gib:g} GiB (try --ref-mode cache, FP8, a shorter --seq-length)"
            )
            return 1
        print(f"layouts of {world} GPUs that fit {args.gpu_memory_gib:g} GiB (least model parallelism first):")
        for plan in plans:
            print(f"  {plan.total / GIB:7.1f} GiB  {plan.layout.describe()}")
        return 0
    try:
        check_layout(shape, layout, world)
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = plan_memory(shape, layout)
    print(format_plan(plan, args.gpu_memory_gib))
    return 0 if plan.fits(args.gpu_memory_gib * GIB) else 1
