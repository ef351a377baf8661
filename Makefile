# make run   - set up .venv (CPU build of torch unless one is there) and run the demo on the default model
# make test  - set up .venv with the test extras and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch: from the local wheel cache if the machine has one, else whatever pip's own
# configuration serves for torch==TORCH_VERSION (point it at a CPU build to avoid a multi-GB CUDA one).
TORCH_VERSION ?= 2.13.0
LOCAL_WHEELS ?= /opt/wheels

.PHONY: run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

TORCH_WHEEL := $(firstword $(wildcard $(LOCAL_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl))

$(VENV)/.torch: | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  ( [ -n "$(TORCH_WHEEL)" ] && $(BIN)/pip install -q "$(TORCH_WHEEL)" ) || \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	@touch $@

$(VENV)/.run: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[server]"
	@touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[server,train,eval,test]"
	@touch $@ $(VENV)/.run

run: $(VENV)/.run
	$(BIN)/deepseek-v2 demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
