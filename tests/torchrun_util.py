"""Launch multi-process test workers with torchrun on CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def run_torchrun(worker: str, nproc: int, *args: str, timeout: float = 600) -> str:
    """Run ``tests/workers/<worker>`` under ``torchrun --standalone`` and return its output.

    Raises AssertionError with the tail of the output when any rank fails.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKERS / worker),
        *args,
    ]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {worker} x{nproc} failed ({proc.returncode}):\n{output[-6000:]}")
    return output
