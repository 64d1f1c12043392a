# `make demo` and `make test` create .venv on first use and are quiet afterwards.
# `make test` skips the tests marked slow (end-to-end runs; MUGCP_TEST_SLOW=1 includes them); `make test-all` and
# CI (.ci/run) run everything and list the 15 slowest tests (CI's time budget: test-all plus its second pass of the
# tests marked numerics under another ATen kernel path, well under 10 minutes on 2 cores).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-all lint format clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,ray]"
	@touch $(STAMP)

demo: $(STAMP)
	@$(VENV)/bin/mugcp-bench demo

test: $(STAMP)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(PY) -m pytest $(if $(filter 1,$(MUGCP_TEST_SLOW)),--durations=15,-m "not slow")

test-all:
	@$(MAKE) --no-print-directory test MUGCP_TEST_SLOW=1

lint: $(STAMP)
	@$(VENV)/bin/ruff check --fix .
	@$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
