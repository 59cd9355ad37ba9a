"""megatron-core's import-time ``torch.compile`` wrappers, not created on a machine without CUDA
(0.16, 0.19).

Creating the first ``torch.compile`` wrapper of a process imports TorchDynamo and Inductor: about
1.6-1.9 s of every process's start on a 2-core CPU machine, half of ``import megatron.core``, paid
by each rank of each launch, each test-pool worker and each tool. megatron-core creates such
wrappers as it is imported, for code that never runs on CPU here:

- ``megatron/core/jit.py`` sets ``jit_fuser = torch.compile``, and about a dozen modules decorate a
  fused element-wise kernel with it (``fusions/fused_bias_geglu.py``, ``fused_bias_dropout.py``,
  ``activations.py``, ...); ``models/gpt.py`` turns every fusion off on the local spec. megatron's
  own switch, ``disable_jit_fuser()``, makes the decorator its no-op one, but only for modules
  decorated after it runs, and ``import megatron.core.jit`` first runs ``megatron/core/__init__.py``,
  which imports the decorated modules. It is called the moment ``jit.py`` has been loaded.
- 0.19's ``transformer/moe/router.py`` decorates ``InferenceTopKRouter``'s routing with
  ``@torch.compile`` directly (inference-only MoE routing, under CUDA graphs). That module is loaded
  with ``torch.compile`` standing for the identity decorator, and ``torch.compile`` is restored
  after it.

:func:`install` (run when ``sampo_megatron`` is imported, before it imports megatron-core) adds the
import hook that does both, each only when ``torch.cuda.is_available()`` is false: on a GPU machine
the wrappers are created as megatron-core intends. A megatron-core imported before ``sampo_megatron``
keeps its wrappers (a slower start, the same numbers: eager and compiled kernels are not run here).
Nothing here imports torch or megatron-core before megatron-core is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any

JIT_MODULE = "megatron.core.jit"
ROUTER_MODULE = "megatron.core.transformer.moe.router"
# Release line -> file:line of what is relied on.
JIT_SITES = {line: "jit.py:11,27 (noop_decorator, disable_jit_fuser)" for line in ("0.16", "0.19")}
ROUTER_SITES = {"0.19": "transformer/moe/router.py:918 (@torch.compile on InferenceTopKRouter)"}


def _compat_error(message: str) -> Exception:
    from .cpu import CompatError

    return CompatError(f"{message}; re-survey sampo_megatron/compat/torch_compile.py")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _line() -> str | None:
    """The installed megatron-core's release line; None outside the tested ones (the start-up
    version check says so later, with what to install)."""
    from .version import UnsupportedMegatronError, release_line

    try:
        return release_line(allow_untested=False).name
    except UnsupportedMegatronError:
        return None


def disable_jit_fuser(jit: Any, cuda_available: bool | None = None) -> bool:
    """After ``megatron.core.jit`` has loaded: make its ``jit_fuser`` megatron's no-op decorator
    when there is no CUDA device.

    Args:
        jit: The ``megatron.core.jit`` module.
        cuda_available: Whether CUDA is available (default: ask torch).

    Returns:
        Whether the fuser was disabled.

    Raises:
        CompatError: the module has no ``disable_jit_fuser`` / ``noop_decorator``.
    """
    if _cuda_available() if cuda_available is None else cuda_available:
        return False
    missing = [name for name in ("disable_jit_fuser", "noop_decorator") if not hasattr(jit, name)]
    if missing:
        raise _compat_error(f"{JIT_MODULE} has no {missing} (expected at {JIT_SITES})")
    jit.disable_jit_fuser()
    return True


def _identity_compile(model: Callable | None = None, **kwargs: Any) -> Any:
    """``torch.compile`` as a decorator that compiles nothing (``@torch.compile`` and ``@torch.compile(...)``)."""
    return model if model is not None else (lambda fn: fn)


def load_router_uncompiled(execute: Callable[[], None], source: str, cuda_available: bool | None = None) -> bool:
    """Run ``execute`` (loading the MoE router module, whose text is ``source``) with
    ``torch.compile`` as the identity decorator, where the installed line compiles at import.

    Returns:
        Whether ``torch.compile`` was replaced while it ran.

    Raises:
        CompatError: the line's module no longer decorates with ``@torch.compile``.
    """
    line = _line()
    if line not in ROUTER_SITES or (_cuda_available() if cuda_available is None else cuda_available):
        execute()
        return False
    if "@torch.compile\n" not in source:
        raise _compat_error(f"{ROUTER_MODULE} no longer decorates with @torch.compile (expected at {ROUTER_SITES[line]})")
    import torch

    real = torch.compile
    torch.compile = _identity_compile
    try:
        execute()
    finally:
        torch.compile = real
    return True


class _Loader(importlib.abc.Loader):
    """Loads a module with its own loader, the way :data:`_HOOKS` says."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if self._name == JIT_MODULE:
            self._loader.exec_module(module)
            disable_jit_fuser(module)
        else:
            load_router_uncompiled(lambda: self._loader.exec_module(module), self._loader.get_source(self._name) or "")

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... (inspect, linecache)
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the two modules as the path finder does and wraps their loaders (once each)."""

    def __init__(self) -> None:
        self.pending = {JIT_MODULE, ROUTER_MODULE}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _Loader(spec.loader, fullname)
        return spec


def install() -> None:
    """Add the import hook (idempotent; nothing to do once megatron-core is imported)."""
    if "megatron.core" in sys.modules or any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]
