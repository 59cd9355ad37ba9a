"""CPU compatibility layer for megatron-core (gloo backend, no GPU), for the release lines 0.16 and
0.19 (compat/version.py).

megatron-core assumes CUDA in a few dozen places: ``torch.cuda.current_device()`` as a device
argument, ``torch.cuda.synchronize()``, literal ``device="cuda"``, the CUDA RNG in the
tensor-parallel RNG tracker, ``param.type() == 'torch.cuda.FloatTensor'`` checks, and
``tensor.cuda()``.
:func:`apply_cpu_compat` redirects exactly those sites to the CPU. On a machine where
``torch.cuda.is_available()`` is true it changes nothing.

The patches are of four kinds, all listed in tables below with the megatron file:line they serve in
each release line. Before patching, :func:`_check_sites` asserts that every listed site exists in
the installed megatron-core (the module still makes the CUDA call, the function still exists), so a
release that moves one fails loudly at start-up instead of the patch becoming a silent no-op.

1. ``torch`` shim (:data:`_SHIMMED_MODULES`): in the listed megatron modules only, the module-global
   name ``torch`` is rebound to a proxy that forwards everything to the real ``torch`` except
   ``torch.cuda`` (current device = CPU, synchronize/empty_cache are no-ops, RNG calls act on the
   CPU generator, the current stream is torch's CPU stream) and the tensor factories (``device="cuda"`` becomes ``"cpu"``). Code outside these
   modules, including torch itself, sees the real ``torch``.
2. RNG: ``tensor_parallel/random.py``'s ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` are
   replaced by CPU-generator versions, so ``CudaRNGStatesTracker`` and megatron's own
   ``model_parallel_cuda_manual_seed`` work (GPTModel's forward forks the tracker even with
   dropout 0, so it must be seeded).
3. Tensor methods (:data:`_CUDA_VIEW_FUNCTIONS`): a few megatron functions compare ``t.type()`` with
   CUDA type names or call ``t.cuda()``. They are wrapped so that, only while they run, a CPU tensor
   reports its CUDA type name (``'torch.cuda.FloatTensor'``) and ``.cuda()`` returns the tensor.
4. ``ShardedTensor.init_data``: callers pass the literal ``"cuda"``; it is mapped to the CPU.

Exercised by ``tests/test_cpu_compat.py``: TP, PP, TPxPP, tied embeddings, megatron DDP with
``finalize_model_grads``, the non-distributed and the distributed optimizer with clipping, and a
fully parallel ``torch_dist`` checkpoint save/load; and by ``tests/test_trainer.py``: the bf16
optimizer (``Float16OptimizerWithFloat16Params``) and distributed-optimizer checkpoints with save
and resume. The fp16 dynamic grad scaler is patched too (overflow check, all-reduce and scaler state
run on CPU). Generation's key/value cache (``StaticInferenceContext``) is allocated on the CPU.
Not patched (they still need CUDA): CUDA graphs, several
distributed-optimizer instances (CUDA streams).
On gloo, interleaved pipelines need ``batch_p2p_comm=False`` (the batched path gave wrong
gradients, see docs/compatibility.md); that is a config choice, not a
patch. With dropout > 0 the tracker logs "CPU RNG state changed within GPU RNG context", because on
CPU the tracked states live in the CPU generator.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .version import release_line

_CPU = torch.device("cpu")
_APPLIED = False


class CompatError(RuntimeError):
    """A megatron-core site that a workaround patches does not exist in the installed version."""


# --------------------------------------------------------------------------------------------
# 1. The ``torch`` shim.
# --------------------------------------------------------------------------------------------

# Factories that megatron calls with device="cuda" or device=torch.cuda.current_device().
_FACTORIES = frozenset(
    {"empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
     "tensor", "arange", "rand", "randn", "randint"}
)  # fmt: skip


def _is_cuda_device(device: Any) -> bool:
    """Whether ``device`` (str, torch.device or ordinal) names a CUDA device."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is a CUDA ordinal in torch's factory API.
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that a CUDA ``device=`` argument becomes the CPU."""

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return wrapper


class _CudaShim:
    """Stands in for ``torch.cuda`` inside shimmed megatron modules; the rest is forwarded."""

    @staticmethod
    def current_device() -> torch.device:
        # Used as ``device=torch.cuda.current_device()``: a torch.device works where an ordinal did.
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        # CPU ops are synchronous; gloo requests are waited on by megatron itself.
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_stream(device: Any = None) -> Any:
        # 0.19's grad sync waits on the current stream's events: CPU work is already in order.
        return torch.cpu.current_stream()

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        # The "CUDA" generator of a CPU process is the CPU generator.
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchShim:
    """Stands in for the ``torch`` module inside shimmed megatron modules."""

    def __init__(self) -> None:
        self.cuda = _CudaShim()
        # Wrapped factories are cached on the instance; everything else is looked up live.
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch shim for megatron-core on CPU>"


@dataclass(frozen=True)
class ShimmedModule:
    """A megatron module whose global ``torch`` is rebound to the shim, and why."""

    module: str
    why: str
    """The functions that need it (names are stable across release lines; lines are not)."""
    calls: tuple[str, ...]
    """The CUDA calls the shim redirects there; each must occur in the module's source, else
    megatron moved them and the entry must be re-surveyed (:func:`_check_sites`)."""
    lines: dict[str, str]
    """Release line (compat/version.py) -> ``file:line`` of those calls in that line."""


_CURRENT_DEVICE = "torch.cuda.current_device()"
# Megatron modules whose global ``torch`` is rebound to the shim. Only modules on the
# training/checkpoint path are listed.
_SHIMMED_MODULES: tuple[ShimmedModule, ...] = (
    ShimmedModule(
        "megatron.core.utils",
        "GlobalMemoryBuffer.get_tensor allocates on current_device() (TP/SP gathers); local_multi_tensor_l2_norm "
        "(grad-norm fallback without Apex/TE) uses device='cuda'",
        (_CURRENT_DEVICE, 'device="cuda"'),
        {"0.16": "utils.py:631,1207", "0.19": "utils.py:715,1332"},
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.layers",
        "the parallel linear/embedding layers allocate weights on current_device() without use_cpu_initialization; "
        "LinearWithGradAccumulationAndAsyncCommunication.backward's all-gather buffer for sequence parallel",
        (_CURRENT_DEVICE,),
        {"0.16": "layers.py:261,552,597,607,873,899,1197,1218", "0.19": "layers.py:305,647,708,718,1000,1041,1363,1403"},
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.mappings",
        "all-gather / reduce-scatter output buffers on current_device()",
        (_CURRENT_DEVICE,),
        {"0.16": "mappings.py:91,141,148,181,442", "0.19": "mappings.py:95,145,152,185,447"},
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.utils",
        "split_tensor_into_1d_equal_chunks / gather_split_1d_tensor buffers on current_device()",
        (_CURRENT_DEVICE,),
        {"0.16": "utils.py:70,91", "0.19": "utils.py:70,91"},
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.data",
        "broadcast_data builds its buffers with device='cuda' / current_device()",
        ("device='cuda'", _CURRENT_DEVICE),
        {"0.16": "data.py:37,86", "0.19": "data.py:37,86"},
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.random",
        "CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed call torch.cuda.get_rng_state / torch.cuda.manual_seed",
        ("torch.cuda.get_rng_state()", "torch.cuda.manual_seed("),
        {"0.16": "random.py:235-238,422", "0.19": "random.py:303-306,490"},
    ),
    ShimmedModule(
        "megatron.core.pipeline_parallel.schedules",
        "the schedules' total_num_tokens = torch.zeros(..., device='cuda')",
        ('device="cuda"',),
        {"0.16": "schedules.py:596,983,2138", "0.19": "schedules.py:749,1121,2292"},
    ),
    ShimmedModule(
        "megatron.core.pipeline_parallel.p2p_communication",
        "_communicate_shapes / create_tensor_recv_* buffers on current_device(); torch.cuda.synchronize()",
        (_CURRENT_DEVICE, "torch.cuda.synchronize()"),
        {"0.16": "p2p_communication.py:190-202,242,313,321,398", "0.19": "p2p_communication.py:211-223,263,334,342,419"},
    ),
    ShimmedModule(
        "megatron.core.distributed.param_and_grad_buffer",
        "DDP param/grad buffers on current_device(); from 0.19 start/finish_grad_sync wait on "
        "torch.cuda.current_stream() (CUDA-graph events, communication stream)",
        (_CURRENT_DEVICE,),
        {"0.16": "param_and_grad_buffer.py:783,800,806", "0.19": "param_and_grad_buffer.py:632,691,814,1162,1180,1186"},
    ),
    ShimmedModule(
        "megatron.core.optimizer.optimizer",
        "MixedPrecisionOptimizer / FP32Optimizer._scale use device='cuda'; ChainedOptimizer.get_loss_scale on current_device()",
        ("device='cuda'", _CURRENT_DEVICE),
        {"0.16": "optimizer.py:473,481,485,907,1141", "0.19": "optimizer.py:690,698,702,1249,1492"},
    ),
    ShimmedModule(
        "megatron.core.optimizer.grad_scaler",
        "loss-scale tensors with device='cuda' (--fp16 dynamic scaler); load_state_dict moves the scale to current_device()",
        ("device='cuda'", _CURRENT_DEVICE),
        {"0.16": "grad_scaler.py:15,88,91,94,140", "0.19": "grad_scaler.py:20,111,114,117,163"},
    ),
    ShimmedModule(
        "megatron.core.optimizer.clip_grads",
        "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 tensors with device='cuda'",
        ("device='cuda'",),
        {"0.16": "clip_grads.py:90,103,115,174,207", "0.19": "clip_grads.py:96,108,112,180,231"},
    ),
    ShimmedModule(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer state buffers on current_device()",
        (_CURRENT_DEVICE,),
        {"0.16": "distrib_optimizer.py:791,1077", "0.19": "distrib_optimizer.py:998,1362"},
    ),
    ShimmedModule(
        "megatron.core.transformer.attention",
        "Attention._allocate_memory puts the static key/value cache of generation on current_device(); "
        "0.19 allocates an inference softmax offset on it too",
        (_CURRENT_DEVICE,),
        {"0.16": "transformer/attention.py:430", "0.19": "transformer/attention.py:530,846"},
    ),
    ShimmedModule(
        "megatron.core.transformer.utils",
        "get_default_causal_mask / get_sliding_window_causal_mask build the mask with device='cuda' (torch "
        "softmax path when attention_mask is None)",
        ('device="cuda"',),
        {"0.16": "transformer/utils.py:35,40", "0.19": "transformer/utils.py:39,44"},
    ),
    ShimmedModule(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "RotaryEmbedding.get_emb moves inv_freq to current_device() on the first forward",
        (_CURRENT_DEVICE,),
        {"0.16": "rotary_pos_embedding.py:162", "0.19": "rotary_pos_embedding.py:162"},
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "preload_tensors calls torch.cuda.synchronize() (torch_dist save)",
        ("torch.cuda.synchronize()",),
        {"0.16": "filesystem_async.py:230", "0.19": "filesystem_async.py:248"},
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.strategies.async_utils",
        "--async-save: TemporalAsyncCaller.schedule_async_call synchronizes; sync_all_async_calls and "
        "AsyncCallsQueue.maybe_finalize_async_calls all-reduce a flag on current_device()",
        ("torch.cuda.synchronize()", _CURRENT_DEVICE),
        {"0.16": "async_utils.py:165,212,604", "0.19": "async_utils.py:224,273,698"},
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "save_state_dict_async_finalize's failure flag on current_device(); verify_global_md_reuse with device='cuda'",
        (_CURRENT_DEVICE, "device='cuda'"),
        {"0.16": "state_dict_saver.py:204,252", "0.19": "state_dict_saver.py:204,252"},
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.strategies.fully_parallel",
        "FullyParallelLoadStrategyWrapper.load calls torch.cuda.synchronize() after the load exchange",
        ("torch.cuda.synchronize()",),
        {"0.16": "fully_parallel.py:271,272,281", "0.19": "fully_parallel.py:286,287,296"},
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.exchange_utils",
        "_get_empty_tensor_for_exchange / exchange_loaded_tensors_gather_rounds buffers with device='cuda'",
        ('device="cuda"',),
        {"0.16": "exchange_utils.py:104,110,326", "0.19": "exchange_utils.py:103,109,329"},
    ),
)
# Calls that exist only from a release line on: {line: {module: calls}}.
_LINE_CALLS: dict[str, dict[str, tuple[str, ...]]] = {
    "0.19": {"megatron.core.distributed.param_and_grad_buffer": ("torch.cuda.current_stream()",)},
}

# --------------------------------------------------------------------------------------------
# 2. RNG state accessors used by the tensor-parallel RNG tracker (tensor_parallel/random.py).
# --------------------------------------------------------------------------------------------


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement for ``random.py:42 _get_cuda_rng_state`` (tracker fork, checkpointing).

    Args:
        device: Ignored; the CPU process has one generator.
        clone: Ignored; ``torch.get_rng_state`` already returns a copy.
        graph_safe: Must be False: CUDA-graph-safe generators do not exist on CPU.

    Returns:
        The CPU generator state.
    """
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA graph) RNG states are not available on CPU")
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement for ``random.py:73 _set_cuda_rng_state`` (tracker add/fork).

    Args:
        new_state: A state returned by :func:`_get_cpu_rng_state`.
        device: Ignored; the CPU process has one generator.
        graph_safe: Must be False: CUDA-graph-safe generators do not exist on CPU.
    """
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA graph) RNG states are not available on CPU")
    torch.set_rng_state(new_state)


# --------------------------------------------------------------------------------------------
# 3. Tensor methods: CUDA type names and .cuda(), only while selected megatron functions run.
# --------------------------------------------------------------------------------------------

_view_depth = 0
_saved_tensor_attrs: dict[str, Any] = {}
_MISSING = object()


def _type_as_cuda(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """``Tensor.type`` that names a CPU tensor by its CUDA type (``torch.cuda.FloatTensor``)."""
    if dtype is not None or kwargs:
        return torch._C.TensorBase.type(self, dtype, non_blocking, **kwargs)
    name = torch._C.TensorBase.type(self)
    return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name


def _cuda_is_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Tensor.cuda`` that leaves a CPU tensor where it is (the "current device")."""
    return self


@contextlib.contextmanager
def _cpu_tensors_as_cuda() -> Iterator[None]:
    """While active, CPU tensors report CUDA type names and ``.cuda()`` is the identity.

    Re-entrant: the methods are restored when the outermost context exits.
    """
    global _view_depth
    if _view_depth == 0:
        for name, replacement in (("type", _type_as_cuda), ("cuda", _cuda_is_identity)):
            _saved_tensor_attrs[name] = torch.Tensor.__dict__.get(name, _MISSING)
            setattr(torch.Tensor, name, replacement)
    _view_depth += 1
    try:
        yield
    finally:
        _view_depth -= 1
        if _view_depth == 0:
            for name, saved in _saved_tensor_attrs.items():
                if saved is _MISSING:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, saved)
            _saved_tensor_attrs.clear()


def _in_cuda_view(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so that it runs inside :func:`_cpu_tensors_as_cuda`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cpu_tensors_as_cuda():
            return fn(*args, **kwargs)

    wrapper._sampo_cuda_view = True  # applied_problems() tells a wrapped function apart
    return wrapper


@dataclass(frozen=True)
class CudaViewFunction:
    """A megatron function that must see CPU tensors as CUDA tensors while it runs."""

    module: str
    path: str
    """Attribute path inside ``module``, e.g. ``DistributedOptimizer.__init__``."""
    why: str
    lines: dict[str, str]
    """Release line -> ``file:line`` of the CUDA type checks / ``.cuda()`` calls."""
    importers: tuple[str, ...] = ()
    """Other modules that imported the same function by name (rebound as well)."""


_CUDA_VIEW_FUNCTIONS: tuple[CudaViewFunction, ...] = (
    CudaViewFunction(
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__",
        "via _build_model_and_main_param_groups, accepts only 'torch.cuda.*Tensor' params (TypeError for CPU ones)",
        {"0.16": "distrib_optimizer.py:361,420,582", "0.19": "distrib_optimizer.py:401,466,758"},
    ),
    CudaViewFunction(
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
        "send_tensor.cuda() before gathering the optimizer state over DP (fully_reshardable checkpoint save)",
        {"0.16": "distrib_optimizer.py:1089", "0.19": "distrib_optimizer.py:1374"},
    ),
    CudaViewFunction(
        "megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
        "accepts only 'torch.cuda.*Tensor' params (--bf16 / --fp16 without the distributed optimizer)",
        {"0.16": "optimizer.py:671,690", "0.19": "optimizer.py:1009,1028"},
    ),
    CudaViewFunction(
        "megatron.core.optimizer.grad_scaler", "DynamicGradScaler.load_state_dict",
        "state_dict['scale'].cuda(current_device()) when resuming --fp16",
        {"0.16": "grad_scaler.py:140", "0.19": "grad_scaler.py:163"},
    ),
    CudaViewFunction(
        "megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
        "asserts param.grad.type() == 'torch.cuda.FloatTensor' (clip_grad > 0)",
        {"0.16": "clip_grads.py:167", "0.19": "clip_grads.py:174"},
        importers=("megatron.core.optimizer.optimizer",),
    ),
    CudaViewFunction(
        "megatron.core.models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer",
        "weight.data.cuda() before the embedding all-reduce (tied embeddings with PP > 1)",
        {"0.16": "language_module.py:244", "0.19": "language_module.py:307"},
    ),
    CudaViewFunction(
        "megatron.core.dist_checkpointing.exchange_utils", "exchange_by_distribution",
        ".cuda() on loaded shards (fully parallel load)",
        {"0.16": "exchange_utils.py:336,499", "0.19": "exchange_utils.py:339,506"},
        importers=("megatron.core.dist_checkpointing.strategies.fully_parallel",),
    ),
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# 4. ShardedTensor.init_data (dist_checkpointing/mapping.py:247).
# --------------------------------------------------------------------------------------------


def _init_data_on_cpu(init_data: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``ShardedTensor.init_data`` so that a CUDA device becomes the CPU.

    exchange_utils.py:98,106 call ``sh_ten.init_data("cuda")``; the default ``init_fn`` is the real
    ``torch.empty`` bound at definition time, so the torch shim cannot reach it.
    """

    @functools.wraps(init_data)
    def wrapper(self: Any, device: Any, *args: Any, **kwargs: Any) -> None:
        return init_data(self, _CPU if _is_cuda_device(device) else device, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------


def _resolve(module: Any, path: str, line: str) -> tuple[Any, str]:
    """The owner object and attribute name for a dotted ``path`` inside ``module``; a clear error
    when megatron-core (release line ``line``) no longer has it."""
    owner = module
    *parents, name = path.split(".")
    for part in [*parents, name]:
        if not hasattr(owner, part):
            raise CompatError(f"{module.__name__}.{path} does not exist in megatron-core (release line {line})")
        if part != name:
            owner = getattr(owner, part)
    return owner, name


def _check_sites(line: str) -> None:
    """Every site the CPU layer patches exists in the installed megatron-core, whose release line is
    ``line``: a module that no longer makes the CUDA call it was shimmed for, or a function that moved,
    stops here instead of the patch silently doing nothing."""
    problems = []
    for entry in _SHIMMED_MODULES:
        if line not in entry.lines:
            problems.append(f"{entry.module}: not surveyed for release line {line}")
            continue
        module = importlib.import_module(entry.module)
        if module.__dict__.get("torch") is not torch:
            problems.append(f"{entry.module}: its global 'torch' is not the torch module")
            continue
        source = inspect.getsource(module)
        calls = entry.calls + _LINE_CALLS.get(line, {}).get(entry.module, ())
        missing = [call for call in calls if call not in source]
        if missing:
            problems.append(f"{entry.module}: no longer calls {missing} (expected at {entry.lines[line]})")
    for fn in _CUDA_VIEW_FUNCTIONS:
        if line not in fn.lines:
            problems.append(f"{fn.module}.{fn.path}: not surveyed for release line {line}")
            continue
        try:
            _resolve(importlib.import_module(fn.module), fn.path, line)
        except CompatError as err:
            problems.append(str(err))
    mapping = importlib.import_module("megatron.core.dist_checkpointing.mapping")
    if not hasattr(mapping.ShardedTensor, "init_data"):
        problems.append("megatron.core.dist_checkpointing.mapping.ShardedTensor.init_data does not exist")
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(random_mod, name):
            problems.append(f"megatron.core.tensor_parallel.random.{name} does not exist")
    if problems:
        raise CompatError(
            f"the CPU compatibility layer does not match this megatron-core (release line {line}):\n  "
            + "\n  ".join(problems)
            + "\nRe-survey sampo_megatron/compat/cpu.py for this release."
        )


def apply_cpu_compat() -> bool:
    """Check megatron-core's version, and patch it so that it runs on CPU with the gloo backend.

    Patches nothing on a machine with CUDA (the version check runs there too). Calling it again is harmless. Must run before the
    first megatron call that touches a patched site (model construction, schedule, optimizer);
    importing megatron before it is fine, the patches rebind module attributes in place.
    Checks the installed megatron-core's version first (compat/version.py), then that every site it
    patches exists in that version (:func:`_check_sites`).

    Returns:
        False when CUDA is available (nothing patched), True when the CPU patches are active.

    Raises:
        UnsupportedMegatronError: megatron-core outside the tested release lines.
        CompatError: a patched site is missing from the installed megatron-core.
    """
    global _APPLIED
    line = release_line().name  # on GPU machines too: this is the start-up version check
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _check_sites(line)

    # 1. torch shim in the listed modules.
    shim = _TorchShim()
    for entry in _SHIMMED_MODULES:
        importlib.import_module(entry.module).torch = shim

    # 2. RNG tracker state accessors (looked up as module globals at call time).
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _get_cpu_rng_state
    random_mod._set_cuda_rng_state = _set_cpu_rng_state

    # 3. Functions that must see CPU tensors as CUDA tensors while they run.
    for fn in _CUDA_VIEW_FUNCTIONS:
        owner, name = _resolve(importlib.import_module(fn.module), fn.path, line)
        original = getattr(owner, name)
        wrapped = _in_cuda_view(original)
        setattr(owner, name, wrapped)
        for importer_name in fn.importers:
            importer = importlib.import_module(importer_name)
            if getattr(importer, name) is original:
                setattr(importer, name, wrapped)

    # 4. ShardedTensor.init_data("cuda").
    mapping = importlib.import_module("megatron.core.dist_checkpointing.mapping")
    mapping.ShardedTensor.init_data = _init_data_on_cpu(mapping.ShardedTensor.init_data)

    _APPLIED = True
    return True


def applied_problems() -> list[str]:
    """Whether the CPU layer is still in place exactly once (checked between runs in one process,
    runtime/leftovers.py): every shimmed module's ``torch`` is the shim, the RNG accessors are the
    CPU ones, and no wrapped function was wrapped again. Empty before :func:`apply_cpu_compat`
    and on a machine with CUDA."""
    if not _APPLIED:
        return []
    problems = []
    for entry in _SHIMMED_MODULES:
        if not isinstance(importlib.import_module(entry.module).__dict__.get("torch"), _TorchShim):
            problems.append(f"{entry.module}: its 'torch' is no longer the CPU shim")
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    if random_mod._get_cuda_rng_state is not _get_cpu_rng_state or random_mod._set_cuda_rng_state is not _set_cpu_rng_state:
        problems.append("megatron.core.tensor_parallel.random: the RNG state accessors are no longer the CPU ones")
    line = release_line().name
    for fn in _CUDA_VIEW_FUNCTIONS:
        owner, name = _resolve(importlib.import_module(fn.module), fn.path, line)
        current = getattr(owner, name)
        if not getattr(current, "_sampo_cuda_view", False):
            problems.append(f"{fn.module}.{fn.path}: no longer wrapped")
        elif getattr(current.__wrapped__, "_sampo_cuda_view", False):
            problems.append(f"{fn.module}.{fn.path}: wrapped twice")
    return problems


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch and megatron's tensor-parallel RNG tracker, on CPU or GPU.

    GPTModel's forward forks the tracker's ``model-parallel-rng`` state (even with dropout 0), so
    this (or megatron's ``model_parallel_cuda_manual_seed``) must run after
    ``parallel_state.initialize_model_parallel`` and before the first forward.

    Args:
        seed: Base seed; megatron derives the per-TP-rank states from it.
    """
    from megatron.core import tensor_parallel

    apply_cpu_compat()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
