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

# pip's own progress bars show while it downloads (the first install takes a minute or two).
$(VENV)/.torch: | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
	  echo "[1/2] installing torch $(TORCH_VERSION) (the largest download)"; \
	  ( [ -n "$(TORCH_WHEEL)" ] && $(BIN)/pip install --progress-bar on "$(TORCH_WHEEL)" ) || \
	  $(BIN)/pip install --progress-bar on "torch==$(TORCH_VERSION)"; }
	@touch $@

$(VENV)/.run: pyproject.toml $(VENV)/.torch
	@echo "[2/2] installing deepseek-v2 and its server extra"
	$(BIN)/pip install --progress-bar on -e ".[server]"
	@touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	@echo "[2/2] installing deepseek-v2 with the server, train, eval and test extras"
	$(BIN)/pip install --progress-bar on -e ".[server,train,eval,test]"
	@touch $@ $(VENV)/.run

run: $(VENV)/.run
	$(BIN)/deepseek-v2 demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
