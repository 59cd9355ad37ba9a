# Two commands do everything: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION := 2.13.0

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# CPU torch goes in first so that nothing pulls a multi-GB CUDA build; on a machine that already has a
# CUDA torch (an NGC container, venv created with --system-site-packages) the existing torch is kept.
$(VENV)/.installed: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "keeping the installed CUDA torch"; \
	else \
		$(PY) -m pip install -q torch==$(TORCH_CPU_VERSION); \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: install
	$(PY) -m pytest -q tests

# The demo starts fresh each time: it removes its own run directory (runs/tiny_cpu) first.
demo: install
	rm -rf runs/tiny_cpu
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 \
		launch/pretrain_sampo.py --config examples/tiny_cpu.yaml

bench: install
	$(PY) bench/logprobs.py
	$(PY) bench/debias_overhead.py
	$(PY) bench/convert_memory.py
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) build *.egg-info
