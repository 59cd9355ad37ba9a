#!/bin/bash
# SamPO under MPI: mpirun starts one process per GPU; mpi4py gives rank, world size and node-local
# rank, and rank 0 broadcasts its host and a free port for torch.distributed's rendezvous
# (sampo_megatron/training/launch_env.py). Needs mpi4py (pip install 'sampo-megatron[mpi]').
# Extra arguments go to pretrain_sampo.py:
#   NODES=2 HOSTFILE=hosts.txt launch/mpi/sampo_mpirun.sh --config examples/recipes/llama3-8b_ultrafeedback.yaml
#   NP=2 launch/mpi/sampo_mpirun.sh --config examples/tiny_cpu.yaml          # CPU, one machine
set -euo pipefail

# ---- knobs -------------------------------------------------------------------------------------
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NP=${NP:-$((NODES * GPUS_PER_NODE))}             # processes in all
HOSTFILE=${HOSTFILE:-}                           # Open MPI hostfile (one line per node: "host slots=8")
PYTHON=${PYTHON:-python}
TP=${TP:-}                                       # --tensor-model-parallel-size (else the config's)
PP=${PP:-}                                       # --pipeline-model-parallel-size
MPIRUN_ARGS=${MPIRUN_ARGS:-}                     # e.g. "--mca btl_tcp_if_include eth0"
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/../.."
PARALLEL=()
[[ -n "$TP" ]] && PARALLEL+=(--tensor-model-parallel-size "$TP")
[[ -n "$PP" ]] && PARALLEL+=(--pipeline-model-parallel-size "$PP")
HOSTS=()
[[ -n "$HOSTFILE" ]] && HOSTS=(--hostfile "$HOSTFILE")
if [[ $(id -u) == 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086
exec mpirun -np "$NP" "${HOSTS[@]}" --map-by "ppr:${GPUS_PER_NODE}:node" --oversubscribe --bind-to none \
    -x OMP_NUM_THREADS -x PATH -x PYTHONPATH -x LD_LIBRARY_PATH $MPIRUN_ARGS \
    "$PYTHON" launch/pretrain_sampo.py "${PARALLEL[@]}" "$@"
