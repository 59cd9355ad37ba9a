"""Fixes for megatron-core's optimizer state with torch's Adam (no Apex / TE fused Adam: CPU, and GPU
machines without Apex), in both tested release lines (0.16, 0.19; compat/version.py).

torch's Adam keeps a per-parameter ``step`` tensor and allocates its state lazily; megatron-core
mishandles both at checkpoint save and load. Each fix below says where; each was seen to fail
without it on both lines (tests/test_trainer.py resumes, the step after a resume included). With
TE's or Apex's fused Adam (the usual GPU set-up) there is no such ``step`` and none of them acts.
:func:`check_sites` asserts that what they rely on exists in the installed release.

Entry points for runtime/checkpointing.py: :func:`prepare_optimizer_state` before asking the
optimizer for its sharded state, :func:`load_optimizer_state` to load one.
"""

from __future__ import annotations

import contextlib

import torch

from .version import release_line

# Reshardable optimizer state for the distributed optimizer: its default sharding type cannot be
# saved on 0.16 ("ShardedTensor.flattened_range is not supported", mapping.py:134); 0.19 changed the
# default to fully_sharded_model_space, which only reshards across DP. fully_reshardable reshards
# across TP, PP and DP on both lines.
DISTRIB_OPTIM_SHARDING_TYPE = "fully_reshardable"


def check_sites() -> None:
    """Raise CompatError when the installed megatron-core lacks what these fixes rely on."""
    import inspect

    from megatron.core.optimizer import optimizer as optimizer_module
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from .cpu import CompatError

    line = release_line().name
    problems = []
    if not hasattr(DistributedOptimizer, "load_parameter_state_from_" + DISTRIB_OPTIM_SHARDING_TYPE):
        problems.append(f"DistributedOptimizer.load_parameter_state_from_{DISTRIB_OPTIM_SHARDING_TYPE} is missing")
    if "common_step" not in inspect.getsource(optimizer_module):
        problems.append("megatron/core/optimizer/optimizer.py no longer saves Adam's step as 'common_step'")
    if problems:
        raise CompatError(
            f"megatron-core {line}: " + "; ".join(problems) + "; re-survey sampo_megatron/compat/optimizer_state.py"
        )


def prepare_optimizer_state(optimizer) -> None:
    """Before ``optimizer.sharded_state_dict(...)``, for a save or a load."""
    check_sites()
    _allocate_torch_adam_state(optimizer)


def load_optimizer_state(optimizer, loaded: dict) -> None:
    """Load ``loaded`` (the optimizer part of a dist_checkpointing load) into ``optimizer``."""
    _complete_param_groups(optimizer, loaded)
    _restore_zero_adam_step(optimizer, loaded)
    with _adam_steps_set_aside(optimizer):
        optimizer.load_state_dict(loaded)
    _untie_adam_steps(optimizer)


def _complete_param_groups(optimizer, loaded: dict) -> None:
    """Read a distributed-optimizer checkpoint into a regular optimizer (e.g. resuming on fewer GPUs
    without ``--use-distributed-optimizer``).

    The loaded param groups then hold only ``params``: the checkpoint keeps the groups, with Adam's
    ``step``, under ``optimizer.param_groups``, and the moments without a ``step``. megatron-core
    (0.16, 0.19) would fail with ``KeyError: 'pre_wd_mult'`` matching the groups, then torch's Adam with
    ``KeyError: 'step'``. The groups get the checkpoint's hyper-parameters (the running optimizer's
    when absent: same grouping of the same model, in the same order) and the moments the
    checkpoint's step as the ``common_step`` the regular optimizer restores per parameter.
    """
    groups = loaded.get("param_groups") if isinstance(loaded, dict) else None
    if not groups or all(len(group) > 1 for group in groups):
        return  # a regular checkpoint: complete groups
    saved = (loaded.get("optimizer") or {}).get("param_groups") or []
    running = getattr(optimizer, "param_groups", None) or []
    for i, group in enumerate(groups):
        for source in (saved[i] if i < len(saved) else {}, running[i] if i < len(running) else {}):
            for key, value in source.items():
                group.setdefault(key, value)
    steps = {group.pop("step") for group in groups if "step" in group}
    torch_state = loaded.get("state")
    if len(steps) == 1 and torch_state and not any("step" in s for s in torch_state.values() if isinstance(s, dict)):
        torch_state.setdefault("common_step", torch.tensor(float(steps.pop())))


def _torch_adams(optimizer, distributed_only: bool = False) -> list:
    """The megatron optimizers in ``optimizer`` that run torch's Adam (no Apex / TE fused Adam).

    torch's Adam keeps a per-parameter ``step`` tensor in its state and allocates its state lazily;
    megatron-core (0.16, 0.19) mishandles both in the places the helpers below fix. With TE's or Apex's
    Adam (the usual GPU set-up) there is no such ``step`` and none of them acts.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [
        inner
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(getattr(inner, "optimizer", None), torch.optim.Adam)
        and (isinstance(inner, DistributedOptimizer) or not distributed_only)
    ]


def _allocate_torch_adam_state(optimizer) -> None:
    """Allocate torch Adam's state where it is still empty, as its first step would: zero moments,
    ``step`` 0. A no-op once the optimizer has stepped.

    Empty state happens in a freshly built optimizer that is about to load, and at a save before
    any successful step (fp16 skips its first steps while the loss scale backs off from 2**32).
    Without it the distributed optimizer's ``state_dict()`` asserts (distrib_optimizer.py:642), and
    the other optimizers save no moments but expect them at load (a ``KeyError`` on
    ``optimizer.state.exp_avg...``).
    """
    for inner in _torch_adams(optimizer):
        adam = inner.optimizer
        if len(adam.state) == 0:
            inner.init_state_fn(adam, inner.config)  # exp_avg, exp_avg_sq
            for group in adam.param_groups:
                for param in group["params"]:
                    adam.state[param]["step"] = torch.tensor(0.0)


def _restore_zero_adam_step(optimizer, loaded: dict) -> None:
    """Put back a zero Adam ``step`` that the non-distributed optimizers did not save.

    They save the step shared by all parameters as ``common_step`` only when it is non-zero
    (optimizer.py:845), and torch's Adam refuses moments without a step (adam.py:127,
    ``KeyError: 'step'``): a checkpoint written before the first successful step (fp16 skips its
    first steps while the loss scale backs off) would not load.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(inners) == 1 else [loaded[k] for k in sorted(loaded)]
    adams = _torch_adams(optimizer)
    for inner, state in zip(inners, states):
        torch_state = state.get("optimizer", {}).get("state") if inner in adams and isinstance(state, dict) else None
        if torch_state and "common_step" not in torch_state and not any("step" in s for s in torch_state.values()):
            torch_state["common_step"] = torch.tensor(0.0)


@contextlib.contextmanager
def _adam_steps_set_aside(optimizer):
    """Keep torch Adam's ``step`` out of the parameter-state load.

    ``load_state_dict`` first restores ``step`` from the param groups, then loads the per-parameter
    tensors by copying every key of a parameter's Adam state from the checkpoint
    (distrib_optimizer.py:940), where ``step`` is absent: ``KeyError: 'step'``. The steps are
    removed for that part of the load and put back unchanged afterwards.
    """
    patched = []
    for inner in _torch_adams(optimizer, distributed_only=True):
        name = "load_parameter_state_from_" + DISTRIB_OPTIM_SHARDING_TYPE
        original = getattr(inner, name)

        def load_without_steps(state_dict, *, _adam=inner.optimizer, _original=original):
            steps = {param: s.pop("step") for param, s in _adam.state.items() if "step" in s}
            try:
                return _original(state_dict)
            finally:
                for param, step in steps.items():
                    _adam.state[param]["step"] = step

        setattr(inner, name, load_without_steps)  # an instance attribute, removed below
        patched.append((inner, name))
    try:
        yield
    finally:
        for inner, name in patched:
            delattr(inner, name)


def _untie_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    After a distributed-optimizer load, megatron-core (0.16: distrib_optimizer.py:821-825; 0.19:
    distrib_optimizer.py:1024-1032) gives
    all parameters one shared ``step`` tensor, which Adam then advances once per parameter: the next
    update is silently wrong. Copies make each advance once per step again.
    """
    for inner in _torch_adams(optimizer):
        for param_state in inner.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()
