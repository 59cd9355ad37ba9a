"""Create the project's virtual environment and install sampo-megatron into it (``make install``).

Run with the base interpreter (``python3 tools/setup_venv.py --venv .venv``); it decides from what
that interpreter already has:

- **A CUDA build of torch** (an NGC PyTorch container, a cluster module): the venv is created with
  ``--system-site-packages`` so that the container's torch, Transformer Engine and NVIDIA apex stay
  visible, and a constraints file pins each of them to the installed version, so that installing
  the package replaces none of them (pip would otherwise be free to fetch another torch).
- **Anything else** (no torch, or a CPU build): a plain venv; the CPU build of torch
  (``--cpu-torch``, default 2.13.0) is installed first, so that nothing pulls a multi-GB CUDA build
  by way of a plain ``torch`` requirement. (On Python 3.11 that wheel lies on local disk on the
  project's CI machines; on Python 3.12 pip fetches PyPI's build, which runs on CPU too.)

Then ``pip install -e ".[dev]"`` under those constraints. The decision is
:func:`plan_install`, a pure function of :class:`BaseInterpreter` (tested in
``tests/test_setup_venv.py``). This script imports nothing from the package: it runs before there
is a venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Distributions a GPU container ships that a pip install must leave alone (as pip names them).
# (importlib.metadata matches names with - and _ alike.)
GPU_DISTRIBUTIONS = ("torch", "transformer-engine", "transformer-engine-torch", "transformer-engine-cu12",
                     "transformer-engine-cu13", "apex")  # fmt: skip


@dataclass
class BaseInterpreter:
    """What the interpreter that creates the venv already has."""

    python: str
    """Its version, ``major.minor``."""
    torch_cuda: str | None = None
    """CUDA version torch was built for (``torch.version.cuda``); None: no torch, or a CPU build."""
    installed: dict[str, str] = field(default_factory=dict)
    """Installed versions of the :data:`GPU_DISTRIBUTIONS` present (distribution -> version)."""


@dataclass
class InstallPlan:
    system_site_packages: bool
    """Create the venv with ``--system-site-packages``."""
    cpu_torch: str | None
    """Version of torch to install before the package, or None to keep the one there."""
    constraints: list[str]
    """pip constraint lines (``name==version``) that keep the base interpreter's GPU stack."""
    reason: str
    """One line for the log: what was found and what is done about it."""


def plan_install(base: BaseInterpreter, cpu_torch: str) -> InstallPlan:
    """What ``make install`` does on an interpreter like ``base``.

    Args:
        base: the facts of the base interpreter (:func:`probe`).
        cpu_torch: the CPU torch version installed when no CUDA torch is there.
    """
    if base.torch_cuda is not None:
        kept = dict(base.installed)
        return InstallPlan(
            system_site_packages=True,
            cpu_torch=None,
            constraints=[f"{name}=={version}" for name, version in sorted(kept.items())],
            reason=(
                f"Python {base.python} has a CUDA torch (CUDA {base.torch_cuda}): the venv sees the system packages "
                f"and keeps {', '.join(f'{n} {v}' for n, v in sorted(kept.items()))}"
            ),
        )
    found = f"a CPU torch {base.installed['torch']}" if "torch" in base.installed else "no torch"
    return InstallPlan(
        system_site_packages=False,
        cpu_torch=cpu_torch,
        constraints=[],
        reason=f"Python {base.python} has {found}: a plain venv with torch {cpu_torch} installed first",
    )


def probe() -> BaseInterpreter:
    """The facts of the running interpreter."""
    from importlib import metadata

    installed = {}
    for name in GPU_DISTRIBUTIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        installed[dist.metadata["Name"]] = dist.version
    torch_cuda = None
    if "torch" in installed:  # PyTorch's own distribution name
        try:
            import torch

            torch_cuda = torch.version.cuda
        except Exception as err:  # a broken torch in the base interpreter: treat as absent
            print(f"setup_venv: the base interpreter's torch does not import ({err}); ignoring it", file=sys.stderr)
            installed.pop("torch")
    return BaseInterpreter(python=f"{sys.version_info[0]}.{sys.version_info[1]}", torch_cuda=torch_cuda, installed=installed)


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=".venv", help="virtual environment directory")
    parser.add_argument("--cpu-torch", default="2.13.0", help="torch version installed when there is no CUDA torch")
    parser.add_argument("--extras", default="dev", help="extras of the package to install")
    parser.add_argument("--plan-only", action="store_true", help="print the plan as JSON and exit")
    args = parser.parse_args(argv)

    plan = plan_install(probe(), args.cpu_torch)
    if args.plan_only:
        print(json.dumps(plan.__dict__))
        return 0
    print(f"setup_venv: {plan.reason}", flush=True)
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        _run(sys.executable, "-m", "venv", *(["--system-site-packages"] if plan.system_site_packages else []), str(venv))
    _run(str(python), "-m", "pip", "install", "-q", "--upgrade", "pip")
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in plan.constraints))
    if plan.cpu_torch is not None:
        _run(str(python), "-m", "pip", "install", "-q", f"torch=={plan.cpu_torch}")
    root = Path(__file__).resolve().parents[1]
    _run(str(python), "-m", "pip", "install", "-q", "-c", str(constraints), "-e", f"{root}[{args.extras}]")
    (venv / ".installed").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
