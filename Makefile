# medpipe: two commands on a fresh machine.
#   make demo   set up .venv and run the main job on synthetic HAM10000-format data
#   make test   set up .venv with the dev extra and run the test suite
#   make docs   build the documentation site into site/ (strict: a broken link or missing page fails)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned so this CPU machine's wheel is used (a GPU machine gets the CUDA build of the same pin)
TORCH  := torch==2.13.0
DEMO   ?= demo_out
# The real SageMaker pieces (training + inference toolkits, TorchServe, SDK 2.x) pin old packages: their own
# venv, with the container-side dependency list and the same torch. A failed install is recorded in
# $(SMVENV)/FAILED and the tests that need it skip with that reason.
SMVENV ?= .venv-sm
SM_PKGS := sagemaker-training==5.1.4 sagemaker-pytorch-training==3.0.0 sagemaker-inference==1.10.1 \
           sagemaker-pytorch-inference==2.0.25 torchserve==0.12.0 torch-model-archiver==0.12.0 "sagemaker>=2.257,<3" \
           "setuptools<81"  # the inference toolkit imports pkg_resources, gone from setuptools 81

# Flower's pins conflict with the dev extra (fastapi, starlette, uvicorn, protobuf, packaging): its own venv
# (medpipe + the fl extra); a failed install is recorded in $(FLVENV)/FAILED and tests/test_fl.py skips
FLVENV ?= .venv-fl

.PHONY: demo test docs venv dev fl bench clean sagemaker-venv

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

$(SMVENV)/.done: src/medpipe/sagemaker/requirements.txt
	rm -rf $(SMVENV) && $(PYTHON) -m venv $(SMVENV)
	( $(SMVENV)/bin/python -m pip install -q --upgrade pip && \
	  $(SMVENV)/bin/python -m pip install -q $(TORCH) $(SM_PKGS) -r src/medpipe/sagemaker/requirements.txt ) \
	  > $(SMVENV)/install.log 2>&1 || tail -5 $(SMVENV)/install.log > $(SMVENV)/FAILED
	touch $@

$(FLVENV)/.done: pyproject.toml
	rm -rf $(FLVENV) && $(PYTHON) -m venv $(FLVENV)
	( $(FLVENV)/bin/python -m pip install -q --upgrade pip && \
	  $(FLVENV)/bin/python -m pip install -q $(TORCH) && $(FLVENV)/bin/python -m pip install -q -e ".[fl]" $(TORCH) ) \
	  > $(FLVENV)/install.log 2>&1 || tail -5 $(FLVENV)/install.log > $(FLVENV)/FAILED
	touch $@

venv: $(VENV)/.core
dev: $(VENV)/.dev
sagemaker-venv: $(SMVENV)/.done
fl: $(FLVENV)/.done

demo: $(VENV)/.serve
	bash scripts/demo.sh $(VENV)/bin/medpipe $(DEMO)

# The Ray tests run as Ray drivers inside their pytest process (ray.init leaves threads and resets the crash
# signals' handlers there): they get a pytest process of their own, so that nothing else runs after them in it.
# Two CI runs whose pytest died of a SIGSEGV with no trace both died after them (tests/crashlog.py).
test: $(VENV)/.dev $(SMVENV)/.done $(FLVENV)/.done
	$(PY) -X faulthandler -m pytest -q --ignore=tests/test_batch_ray.py
	$(PY) -X faulthandler -m pytest -q tests/test_batch_ray.py

docs: $(VENV)/.dev
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(VENV)/.dev
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/batch.py

clean:
	rm -rf $(VENV) $(SMVENV) $(FLVENV) $(DEMO) .pytest_cache site
