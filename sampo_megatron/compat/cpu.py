"""CPU compatibility layer for megatron-core (written against 0.16.1, gloo backend, no GPU).

megatron-core assumes CUDA in a few dozen places: ``torch.cuda.current_device()`` as a device
argument, ``torch.cuda.synchronize()``, literal ``device="cuda"``, the CUDA RNG in the
tensor-parallel RNG tracker, ``param.type() == 'torch.cuda.FloatTensor'`` checks, and
``tensor.cuda()``.
:func:`apply_cpu_compat` redirects exactly those sites to the CPU. On a machine where
``torch.cuda.is_available()`` is true it changes nothing.

The patches are of four kinds, all listed in tables below with the megatron file:line they serve:

1. ``torch`` shim (:data:`_SHIMMED_MODULES`): in the listed megatron modules only, the module-global
   name ``torch`` is rebound to a proxy that forwards everything to the real ``torch`` except
   ``torch.cuda`` (current device = CPU, synchronize/empty_cache are no-ops, RNG calls act on the
   CPU generator) and the tensor factories (``device="cuda"`` becomes ``"cpu"``). Code outside these
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
run on CPU). Not patched (they still need CUDA): CUDA graphs, inference KV caches, several
distributed-optimizer instances (CUDA streams), async checkpoint save (``async_utils.py``).
On gloo, interleaved pipelines need ``batch_p2p_comm=False`` (the batched path gave wrong
gradients, see ``/work/shared/notes/megatron-core-on-cpu.md``); that is a config choice, not a
patch. With dropout > 0 the tracker logs "CPU RNG state changed within GPU RNG context", because on
CPU the tracked states live in the CPU generator.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

_CPU = torch.device("cpu")
_APPLIED = False

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


# Megatron modules whose global ``torch`` is rebound to the shim, and the sites that need it
# (megatron-core 0.16.1 line numbers). Only modules on the training/checkpoint path are listed.
_SHIMMED_MODULES: dict[str, str] = {
    "megatron.core.utils": (
        "utils.py:631 GlobalMemoryBuffer.get_tensor allocates on current_device() (TP/SP gathers); "
        "utils.py:1207 local_multi_tensor_l2_norm (grad-norm fallback without Apex/TE) uses "
        "device='cuda'"
    ),
    "megatron.core.tensor_parallel.layers": (
        "layers.py:261,597,607,873,899,1197,1218 allocate weights on current_device() without "
        "use_cpu_initialization; layers.py:552 all-gather buffer for sequence parallel"
    ),
    "megatron.core.tensor_parallel.mappings": (
        "mappings.py:91,141,148,181,442 all-gather / reduce-scatter output buffers on "
        "current_device()"
    ),
    "megatron.core.tensor_parallel.utils": (
        "utils.py:70,91 split/gather_split_1d_tensor buffers on current_device()"
    ),
    "megatron.core.tensor_parallel.data": (
        "data.py:37,86 broadcast_data builds its buffers with device='cuda' / current_device()"
    ),
    "megatron.core.tensor_parallel.random": (
        "random.py:235-238 CudaRNGStatesTracker.add and random.py:422 "
        "model_parallel_cuda_manual_seed call torch.cuda.get_rng_state / torch.cuda.manual_seed"
    ),
    "megatron.core.pipeline_parallel.schedules": (
        "schedules.py:596,983,2138 total_num_tokens = torch.zeros(..., device='cuda')"
    ),
    "megatron.core.pipeline_parallel.p2p_communication": (
        "p2p_communication.py:190-202,313,321 shape/recv buffers on current_device(); "
        "p2p_communication.py:242,398 torch.cuda.synchronize()"
    ),
    "megatron.core.distributed.param_and_grad_buffer": (
        "param_and_grad_buffer.py:783,800,806 DDP param/grad buffers on current_device()"
    ),
    "megatron.core.optimizer.optimizer": (
        "optimizer.py:473,481,485 MixedPrecisionOptimizer and optimizer.py:907 "
        "FP32Optimizer._scale use device='cuda'; optimizer.py:1141 "
        "ChainedOptimizer.get_loss_scale on current_device()"
    ),
    "megatron.core.optimizer.grad_scaler": (
        "grad_scaler.py:15,88,91,94 loss-scale tensors with device='cuda' (--fp16 dynamic scaler); "
        "grad_scaler.py:140 load_state_dict moves the scale to current_device()"
    ),
    "megatron.core.optimizer.clip_grads": (
        "clip_grads.py:90,103,115,174,207 norm/overflow/zero-count tensors with device='cuda'"
    ),
    "megatron.core.optimizer.distrib_optimizer": (
        "distrib_optimizer.py:791 state buffers on current_device()"
    ),
    "megatron.core.transformer.utils": (
        "transformer/utils.py:35,40 get_default_causal_mask / get_sliding_window_causal_mask build "
        "the mask with device='cuda' (torch softmax path when attention_mask is None)"
    ),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "rotary_pos_embedding.py:162 get_emb moves inv_freq to current_device() on first forward"
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "filesystem_async.py:230 preload_tensors calls torch.cuda.synchronize() (torch_dist save)"
    ),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "state_dict_saver.py:252 save failure flag on current_device(); state_dict_saver.py:204 "
        "cached-plan check with device='cuda'"
    ),
    "megatron.core.dist_checkpointing.strategies.fully_parallel": (
        "fully_parallel.py:272,281 torch.cuda.synchronize() after the fully parallel load exchange"
    ),
    "megatron.core.dist_checkpointing.exchange_utils": (
        "exchange_utils.py:104,110,326 exchange buffers with device='cuda'"
    ),
}

# --------------------------------------------------------------------------------------------
# 2. RNG state accessors used by the tensor-parallel RNG tracker (tensor_parallel/random.py).
# --------------------------------------------------------------------------------------------


def _get_cpu_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
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


def _type_as_cuda(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
) -> Any:
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

    return wrapper


# (module, attribute path, other modules that imported the same name, site and reason)
_CUDA_VIEW_FUNCTIONS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.__init__",
        (),
        "distrib_optimizer.py:361,420,582 (via _build_model_and_main_param_groups) accept only "
        "'torch.cuda.*Tensor' params and raise TypeError for CPU ones",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.get_parameter_state_dp_zero",
        (),
        "distrib_optimizer.py:1089 send_tensor.cuda() before gathering the optimizer state over DP "
        "(fully_reshardable checkpoint save, trainer --use-distributed-optimizer)",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.__init__",
        (),
        "optimizer.py:671,690 accept only 'torch.cuda.*Tensor' params and raise TypeError for CPU "
        "ones (--bf16 / --fp16 without the distributed optimizer)",
    ),
    (
        "megatron.core.optimizer.grad_scaler",
        "DynamicGradScaler.load_state_dict",
        (),
        "grad_scaler.py:140 state_dict['scale'].cuda(current_device()) when resuming --fp16",
    ),
    (
        "megatron.core.optimizer.clip_grads",
        "clip_grad_by_total_norm_fp32",
        ("megatron.core.optimizer.optimizer",),
        "clip_grads.py:167 asserts param.grad.type() == 'torch.cuda.FloatTensor' (clip_grad > 0)",
    ),
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
        (),
        "language_module.py:244 weight.data.cuda() before the embedding all-reduce "
        "(tied embeddings with PP > 1)",
    ),
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        "exchange_by_distribution",
        ("megatron.core.dist_checkpointing.strategies.fully_parallel",),
        "exchange_utils.py:336,499 .cuda() on loaded shards (fully parallel load)",
    ),
)


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


def _resolve(module: Any, path: str) -> tuple[Any, str]:
    """Return the owner object and attribute name for a dotted ``path`` inside ``module``."""
    owner = module
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def apply_cpu_compat() -> bool:
    """Patch megatron-core so that it runs on CPU with the gloo backend.

    Does nothing on a machine with CUDA. Calling it again is harmless. Must run before the
    first megatron call that touches a patched site (model construction, schedule, optimizer);
    importing megatron before it is fine, the patches rebind module attributes in place.

    Returns:
        False when CUDA is available (nothing patched), True when the CPU patches are active.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # 1. torch shim in the listed modules.
    shim = _TorchShim()
    for module_name in _SHIMMED_MODULES:
        module = importlib.import_module(module_name)
        if module.__dict__.get("torch") is not torch:
            raise RuntimeError(f"{module_name}.torch is not the torch module (megatron changed?)")
        module.torch = shim

    # 2. RNG tracker state accessors (looked up as module globals at call time).
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _get_cpu_rng_state
    random_mod._set_cuda_rng_state = _set_cpu_rng_state

    # 3. Functions that must see CPU tensors as CUDA tensors while they run.
    for module_name, path, importers, _reason in _CUDA_VIEW_FUNCTIONS:
        owner, name = _resolve(importlib.import_module(module_name), path)
        original = getattr(owner, name)
        wrapped = _in_cuda_view(original)
        setattr(owner, name, wrapped)
        for importer_name in importers:
            importer = importlib.import_module(importer_name)
            if getattr(importer, name) is original:
                setattr(importer, name, wrapped)

    # 4. ShardedTensor.init_data("cuda").
    mapping = importlib.import_module("megatron.core.dist_checkpointing.mapping")
    mapping.ShardedTensor.init_data = _init_data_on_cpu(mapping.ShardedTensor.init_data)

    _APPLIED = True
    return True


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
