"""Layout checks (what megatron-core would reject later, said up front) and the search for layouts
that fit."""

from __future__ import annotations

import dataclasses

from .memory import GIB, MemoryPlan, plan_memory
from .shapes import Layout, ModelShape


class LayoutError(ValueError):
    """A layout the model cannot be split into; the message lists every problem."""


def split_problems(heads: int, groups: int, layers: int, tp: int, pp: int, vpp: int = 1, ffn: int | None = None) -> list[str]:
    """Why megatron-core cannot split a model with ``heads`` attention heads, ``groups`` key/value
    heads, ``layers`` layers (and an MLP ``ffn`` wide) over TP ``tp``, PP ``pp`` and ``vpp`` virtual
    stages per pipeline rank; empty when it can. The one statement of these rules (the trainer's
    validation, ``--dry-run``, the planner and the converter use it).

    Query groups may be fewer than TP: megatron-core then gives each TP rank one key/value head,
    replicated over TP / groups ranks, so groups and TP need only divide one another.
    """
    problems = []
    if heads % tp:
        problems.append(f"attention heads ({heads}) not divisible by --tensor-model-parallel-size {tp}")
    if groups % tp and tp % groups:
        problems.append(f"query groups ({groups}) and --tensor-model-parallel-size {tp}: one must divide the other")
    if ffn is not None and ffn % tp:
        problems.append(f"MLP width ({ffn}) not divisible by --tensor-model-parallel-size {tp}")
    if layers % (pp * vpp):
        problems.append(f"layers ({layers}) not divisible by --pipeline-model-parallel-size {pp} x virtual stages {vpp}")
    return problems


def layout_problems(shape: ModelShape, layout: Layout, world_size: int | None = None) -> list[str]:
    """Every reason ``layout`` cannot run ``shape`` (empty when it can).

    Args:
        shape: the model.
        layout: the layout.
        world_size: GPUs of the run, when known: must be TP x PP x CP x DP.
    """
    t = layout.tp
    problems = split_problems(shape.num_attention_heads, shape.num_query_groups, shape.num_layers, t, layout.pp, layout.vpp)
    if layout.global_batch_size % (layout.micro_batch_size * layout.dp):
        problems.append(
            f"--global-batch-size {layout.global_batch_size} not divisible by --micro-batch-size "
            f"{layout.micro_batch_size} x data-parallel size {layout.dp}"
        )
    if layout.sequence_parallel and layout.seq_length % t:
        problems.append(
            f"--seq-length {layout.seq_length} not divisible by --tensor-model-parallel-size {t} (--sequence-parallel)"
        )
    if layout.cp > 1 and layout.seq_length % (2 * layout.cp):
        problems.append(f"--seq-length {layout.seq_length} not divisible by 2 x --context-parallel-size {layout.cp}")
    if world_size is not None and world_size != layout.world_size:
        problems.append(
            f"{world_size} GPUs is not a multiple of TP {t} x PP {layout.pp} x CP {layout.cp} "
            f"(data-parallel size would be {world_size / (t * layout.pp * layout.cp):g})"
        )
    chunk_layers = shape.num_layers // max(1, layout.pp * layout.vpp)
    if layout.recompute_granularity == "full":
        n = layout.recompute_num_layers
        if layout.recompute_method not in ("uniform", "block"):
            problems.append("--recompute-granularity full needs --recompute-method uniform or block")
        if n is None or not 1 <= n <= chunk_layers:
            problems.append(f"--recompute-num-layers must be between 1 and the layers per model chunk ({chunk_layers}), got {n}")
    elif layout.recompute_granularity == "selective" and layout.recompute_num_layers is not None:
        problems.append("--recompute-granularity selective takes no --recompute-num-layers")
    return problems


def check_layout(shape: ModelShape, layout: Layout, world_size: int | None = None) -> None:
    """Raise :class:`LayoutError` naming every problem of ``layout``."""
    problems = layout_problems(shape, layout, world_size)
    if problems:
        raise LayoutError(f"bad layout ({layout.describe()}):\n  - " + "\n  - ".join(problems))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(
    shape: ModelShape, base: Layout, gpus: int, gpus_per_node: int, gpu_gib: float, limit: int = 20
) -> list[MemoryPlan]:
    """Layouts of ``gpus`` GPUs that fit ``gpu_gib`` each, smallest model parallelism first.

    Tries TP within a node (powers of two up to ``gpus_per_node``), every PP that divides the layers,
    DP the rest; with and without the distributed optimizer, sequence parallelism (with TP > 1) and
    full uniform recomputation of every layer. Micro-batch, sequence, precision, CP and the
    reference mode stay as in ``base``.
    """
    found = []
    tps = [t for t in _divisors(gpus_per_node) if t & (t - 1) == 0]
    for tp in tps:
        for pp in _divisors(shape.num_layers):
            if gpus % (tp * pp * base.cp):
                continue
            dp = gpus // (tp * pp * base.cp)
            for dist_opt in (False, True):
                for recompute in (False, True):
                    layout = dataclasses.replace(
                        base, tp=tp, pp=pp, vpp=1, dp=dp, distributed_optimizer=dist_opt or base.distributed_optimizer,
                        sequence_parallel=tp > 1,
                        recompute_granularity="full" if recompute else None,
                        recompute_method="uniform" if recompute else None,
                        recompute_num_layers=1 if recompute else None,
                        global_batch_size=max(base.global_batch_size, base.micro_batch_size * dp),
                    )  # fmt: skip
                    if layout_problems(shape, layout):
                        continue
                    plan = plan_memory(shape, layout)
                    if plan.fits(gpu_gib * GIB):
                        found.append(plan)
    # Least model parallelism and recomputation first, then least memory.
    found.sort(
        key=lambda p: (
            p.layout.tp * p.layout.pp,
            p.layout.recompute_granularity is not None,
            p.layout.distributed_optimizer,
            p.total,
        )
    )
    return found[:limit]
