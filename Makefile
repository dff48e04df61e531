# medpipe: two commands on a fresh machine.
#   make demo   set up .venv and run the main job on synthetic HAM10000-format data
#   make test   set up .venv with the dev extra and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned so this CPU machine's wheel is used (a GPU machine gets the CUDA build of the same pin)
TORCH  := torch==2.13.0
DEMO   ?= demo_out

.PHONY: demo test venv dev bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.serve: $(VENV)/.core
	$(PIP) install -q -e ".[serve]" $(TORCH)
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -q -e ".[dev]" $(TORCH)
	touch $@

venv: $(VENV)/.core
dev: $(VENV)/.dev

demo: $(VENV)/.serve
	bash scripts/demo.sh $(VENV)/bin/medpipe $(DEMO)

test: $(VENV)/.dev
	$(PY) -m pytest -q

bench: $(VENV)/.dev
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/batch.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
