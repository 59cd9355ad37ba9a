"""Rank, world size and rendezvous address from the launcher: torchrun, srun or mpirun.

``torch.distributed``'s ``env://`` rendezvous reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` (and the trainer reads ``LOCAL_RANK`` to pick its GPU). torchrun sets all of them.
Two other launchers start one process per GPU themselves and set their own variables instead:

- ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the
  allocation's node list; the rendezvous host is the first node of the allocation and the port is
  derived from the job id, so every task computes the same address without communicating.
- ``mpirun``: mpi4py gives rank, size and the node-local rank (a shared-memory split of
  ``COMM_WORLD``); rank 0 broadcasts its host name and a free port.

:func:`launch_env` maps these to the ``env://`` variables; it only ever fills variables that are
unset: ``RANK`` set (by torchrun or by hand) means nothing is mapped, and a ``MASTER_ADDR`` /
``MASTER_PORT`` given by the user wins over the derived address.
"""

from __future__ import annotations

import os
import random
import re
import socket
from typing import Mapping

# Open MPI, MPICH / Intel MPI (PMI), PMIx-based launchers.
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
# Ports 20000-39999: clear of the usual service ports and of Linux's default ephemeral range
# (32768-60999 overlaps only partly; a clash there is a bad job id, and MASTER_PORT overrides).
_PORT_BASE, _PORT_SPAN = 20000, 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, e.g. ``gpu[007-009,012],login1`` -> ``gpu007``.

    Each bracket group contributes the start of its first range, zero padding kept
    (``rack[2-3]-n[01-04]`` -> ``rack2-n01``).

    Raises:
        ValueError: an empty list or unbalanced brackets.
    """
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ValueError(f"unbalanced ']' in SLURM node list {nodelist!r}")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    if depth > 0 or first.count("[") != first.count("]"):
        raise ValueError(f"unbalanced '[' in SLURM node list {nodelist!r}")
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return host


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port every task of a SLURM job derives from its id: 20000 + id mod 20000."""
    return _PORT_BASE + int(job_id) % _PORT_SPAN


def launcher(environ: Mapping[str, str]) -> str:
    """Which launcher started this process: ``torchrun`` (``RANK`` set, also by hand), ``slurm``
    (an srun task), ``mpi`` (an MPI rank) or ``single`` (none: one process)."""
    if "RANK" in environ:
        return "torchrun"
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return "slurm"
    if any(v in environ for v in _MPI_RANK_VARS):
        return "mpi"
    return "single"


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``env://`` variables of an srun task (one task per GPU).

    Args:
        environ: the task's environment: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``
            (default 0), ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``; default ``localhost``)
            and ``SLURM_JOB_ID`` (or ``SLURM_JOBID``) for the port; ``MASTER_ADDR`` /
            ``MASTER_PORT`` already set are kept.
    """
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "localhost"
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if "MASTER_PORT" not in environ and job_id is None:
        raise ValueError("srun launch: SLURM_JOB_ID is unset, so no rendezvous port can be derived; set MASTER_PORT")
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_port(job_id)),
    }


def free_port() -> int:
    """A TCP port nothing listens on right now, from 20000 up to the kernel's ephemeral range.

    The port is chosen here and bound later by another process; a port the kernel hands out for
    ``bind(port 0)`` or an outgoing connection (gloo's, another job's) could be taken in between,
    so the choice stays below that range (``/proc/sys/net/ipv4/ip_local_port_range``).
    """
    low = _PORT_BASE
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768  # Linux's default start of the ephemeral range
    if high <= low:
        high = low + _PORT_SPAN
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high - 1}; set MASTER_PORT")


def mpi_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``env://`` variables of an MPI rank, from mpi4py (collective: every rank must call it).

    Raises:
        RuntimeError: mpi4py is not installed.
    """
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError("launched by mpirun, but mpi4py is not installed: pip install 'sampo-megatron[mpi]'") from err
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank = local.Get_rank()
    local.Free()
    address = None
    if comm.Get_rank() == 0:
        address = (environ.get("MASTER_ADDR") or socket.gethostname(), environ.get("MASTER_PORT") or str(free_port()))
    master_addr, master_port = comm.bcast(address, root=0)
    return {
        "RANK": str(comm.Get_rank()),
        "WORLD_SIZE": str(comm.Get_size()),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": master_port,
    }


def single_env(environ: Mapping[str, str]) -> dict[str, str]:
    """One process started without a launcher (``python launch/pretrain_sampo.py``)."""
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
        # Port 0: the one process's store binds a port the kernel picks, so no other process can
        # take it between a choice made here and the bind.
        "MASTER_PORT": environ.get("MASTER_PORT") or "0",
    }


def launch_env(environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """``(launcher, variables)``: the ``env://`` variables this process lacks (torchrun: none)."""
    kind = launcher(environ)
    if kind == "torchrun":
        return kind, {}
    return kind, {"slurm": slurm_env, "mpi": mpi_env, "single": single_env}[kind](environ)


def world_size_from_launcher(environ: Mapping[str, str]) -> int | None:
    """The number of processes the launcher started, read without any communication (``--dry-run``),
    or ``None`` when no launcher says."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if environ.get(var):
            return int(environ[var])
    return None


def apply_launch_env() -> str:
    """Fill ``os.environ`` with the variables :func:`launch_env` finds; returns the launcher's name."""
    kind, variables = launch_env(os.environ)
    os.environ.update(variables)
    return kind
