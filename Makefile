# Two commands do everything: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION := 2.13.0

.PHONY: install test test-fast demo bench gpu-wheels clean length-bias

install: $(VENV)/.installed

# tools/setup_venv.py decides from what $(PYTHON) already has: with a CUDA torch (an NGC container)
# the venv sees the system packages and torch / Transformer Engine / apex are pinned as installed;
# otherwise CPU torch goes in first so that nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: setup.py pyproject.toml tools/setup_venv.py
	$(PYTHON) tools/setup_venv.py --venv $(VENV) --cpu-torch $(TORCH_CPU_VERSION)

# Two test files at a time (pytest-xdist; a file's tests stay together, so its module-scoped runs are
# made once): the multi-rank tests leave a core idle about a quarter of the time (rendezvous, a rank
# waiting for another, one-rank jobs). TEST_WORKERS=0 runs them one after the other.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q --durations=25 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) tests

# The unit tests only (no torchrun / multi-process runs): under two minutes.
test-fast: install
	$(PY) -m pytest -q -m "not multiprocess" tests

# The demo starts fresh each time: it removes its own run directory (runs/tiny_cpu) first.
demo: install
	rm -rf runs/tiny_cpu
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 \
		launch/pretrain_sampo.py --config examples/tiny_cpu.yaml

# The length-bias study (12 methods x 3 data sets x 3 seeds, under 30 min on 2 cores); writes docs/length_bias_study.md (+ PNGs).
length-bias: install
	$(PY) examples/length_bias/run.py

bench: install
	$(PY) bench/logprobs.py
	$(PY) bench/debias_overhead.py
	$(PY) bench/convert_memory.py
	$(PY) bench/preprocess.py
	$(PY) bench/sampo_vs_loop.py
	$(PY) bench/vs_trl.py

# Wheels bench/gpu_check.sh installs on a GPU machine without network: Python 3.12, so the megatron-core
# of the Python 3.12 leg (that machine's torch is used, so --no-deps: megatron-core's torch
# requirement would fetch a CUDA build).
GPU_MEGATRON_CORE := 0.19.2
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 -d bench/gpu_wheels megatron-core==$(GPU_MEGATRON_CORE) numpy packaging

clean:
	rm -rf $(VENV) .venv-py312 build *.egg-info
