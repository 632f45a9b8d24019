# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need,
# and build mmcoconut's C++ op ahead of time (content-keyed cache, seconds when already built), so nothing compiles
# silently at run time. TORCH_EXTENSIONS_DIR / MMCOCONUT_EXT_DIR are cache roots: builds go to keyed subdirs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The exact versions CI tests (a lock file): every install step below takes them. Renewed on purpose with `make lock`.
CONSTRAINTS ?= constraints.txt
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/mmcoconut/torch_extensions
export MMCOCONUT_EXT_DIR ?= $(HOME)/.cache/mmcoconut/extensions
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmcoconut-installed

.PHONY: demo test test-all install clean-demo showcase lock

install: $(STAMP)
	$(BIN)/python -m mmcoconut.cli.build_ops || echo "install: the C++ op did not build (see above); inject_embeddings falls back to the PyTorch reference"

# torch first (never let a later step pick a CUDA build on a CPU machine), then the package with DS_BUILD_OPS=0; both
# pinned by $(CONSTRAINTS) (torch itself by TORCH_SPEC).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/python -c "import torch, deepspeed, transformers, webdataset; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
	touch $@

# `make demo ARCH=llama` (or qwen2, mistral; VISION=siglip): the same demo on a tiny model of that family.
ARCH ?= gpt2
VISION ?= clip
demo: install
	PATH=$(abspath $(BIN)):$$PATH ARCH=$(ARCH) VISION=$(VISION) bash tools/demo.sh

# A task where the continuous thoughts carry the reasoning (3-hop pointer chasing, tools/showcase.sh; SEED=2 make showcase; seed 1 fails in stage 0, bench/RESULTS.md).
showcase: install
	PATH=$(abspath $(BIN)):$$PATH bash tools/showcase.sh

# `make test`: the suite CI runs (≤ 8 min with the install on 2 cores). `make test-all` adds the `slow` tests:
# more ZeRO x precision / config combinations of what the default suite already proves (run it before a release).
test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: install
	$(BIN)/python -m pytest -q tests

# Renew constraints.txt from .venv after upgrading on purpose (.venv/bin/pip install -U PKG): review the diff, run
# `make test`, commit it. tools/lock_constraints.py --check says whether .venv matches the file.
lock:
	$(BIN)/python tools/lock_constraints.py $(CONSTRAINTS)

clean-demo:
	rm -rf runs/demo runs/demo-* shards/synthetic models/tiny models/tiny-*
