#!/bin/bash
# One-GPU check for an H100 / H200 machine that has Python 3.12 and torch, but neither megatron-core
# nor Transformer Engine, and no network. It installs the wheels carried in bench/gpu_wheels/ (into a
# venv that sees the machine's torch), then runs bench/gpu_check.py under a time limit:
#   BF16 step time and MFU of policy + reference (largest Llama-3-shaped model that fits the GPU),
#   the planner's predicted peak against the measured one, the log-prob op against log_softmax,
#   and FP8 against BF16 when a Transformer Engine wheel was carried along.
#
# Fetch the wheels beforehand, on a machine with network (docs/benchmarks.md):
#   make gpu-wheels
# which runs (--no-deps: megatron-core requires torch, and pip would fetch a CUDA torch):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d bench/gpu_wheels megatron-core==0.19.2 numpy packaging
# (0.19.2: the megatron-core of the Python 3.12 leg, docs/compatibility.md)
#
#   bash bench/gpu_check.sh                 # prints one JSON line last; also writes $OUT/gpu_check.json
#   CPU_SMOKE=1 bash bench/gpu_check.sh     # the same script on CPU with a tiny model
set -euo pipefail

# ---- knobs -------------------------------------------------------------------------------------
WHEELS=${WHEELS:-bench/gpu_wheels}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/sampo_gpu_venv}
LIMIT_S=${LIMIT_S:-540}                 # the whole check stays inside 10 minutes
SEQ_LENGTH=${SEQ_LENGTH:-2048}
OUT=${OUT:-/tmp}
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."
start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"   # keeps the machine's torch (and TE, if any)
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if ! ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1; then
        echo "no megatron-core wheel in $WHEELS: fetch it first (see the top of this script)" >&2
        exit 2
    fi
    # torch is the machine's; numpy and packaging from the machine when it has them, else the folder
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" megatron-core
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" numpy "packaging>=24.2"
fi
if ! "$PY" -c "import transformer_engine" 2>/dev/null && ls "$WHEELS"/transformer_engine*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "transformer_engine[pytorch]" || echo "Transformer Engine wheels did not install"
fi
"$PY" -c "import torch, megatron.core; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'megatron-core', megatron.core.__version__)"
"$PY" -c "import transformer_engine" 2>/dev/null && echo "Transformer Engine: importable" || echo "Transformer Engine: not importable (FP8 part skipped)"

ARGS=(--seq-length "$SEQ_LENGTH")
[[ -n "${CPU_SMOKE:-}" ]] && ARGS+=(--cpu-smoke)
left=$((LIMIT_S - ($(date +%s) - start)))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
timeout "$left" "$PY" bench/gpu_check.py "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log" | grep -v -i "warn"
tail -n 1 "$OUT/gpu_check.log" > "$OUT/gpu_check.json"
echo "seconds: $(($(date +%s) - start))"
