# Two entry points for a fresh machine: `make demo` and `make test`.
# `install` keeps a torch that is already there (a CUDA build on a GPU machine); where none is
# installed it puts the CPU build in place first, so the unpinned range in pyproject.toml never
# pulls several GB of CUDA wheels onto a machine without a GPU.
PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0
FAISS_EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: install demo test lint

# On a CUDA machine the [gpu] extra's faiss-gpu (Hopper included) replaces any other FAISS build: two
# packages that both install the `faiss` module would overwrite each other's files.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_CPU)"
	@if [ "$(FAISS_EXTRA)" = gpu ]; then $(PYTHON) -m pip uninstall -q -y faiss-cpu faiss-gpu-cu12 2>/dev/null || true; fi
	$(PYTHON) -m pip install -q -e ".[$(FAISS_EXTRA),dev]"

demo: install
	$(PYTHON) -m grads_ray demo --output runs/demo

# Two pytest processes share the files (-n 2, a file's tests on one process, each with its own local
# Ray); the cluster test, which starts `ray start` nodes of its own, runs alone after them.
test: install
	$(PYTHON) -m pytest -q tests -n 2 --dist loadfile -m "not cluster"
	$(PYTHON) -m pytest -q tests -m cluster

lint:
	$(PYTHON) -m ruff check grads_ray tests jobs benchmarks
