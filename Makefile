# `make demo` and `make test` each do the whole set-up on a fresh Debian machine, idempotently:
# system packages (apt-get), the virtualenv in .venv, the package with pinned versions.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := sox libsox-fmt-all fluidsynth
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: demo test setup system ui clean

demo: setup
	dvc repro
	dvc metrics show

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile --no-loadscope-reorder tests

setup: system $(VENV)/.installed

system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# torch's CUDA build makes the venv 8.7 GB, and pip holds the wheels it downloads until it has installed them
# all: installing torch first, then the rest, peaks at 10.4 GB of disk instead of 12.8 (bench/RESULTS.md).
$(VENV)/.installed: pyproject.toml constraints.txt
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ ! -x $(BIN)/python ] && [ "$$free_gb" -lt 11 ]; then echo "warning: $$free_gb GB free on $$(df -P . | awk 'NR==2 {print $$6}'); a fresh .venv needs about 11 GB while installing"; fi
	[ -x $(BIN)/python ] || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch torchaudio
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

ui: setup
	$(BIN)/presto ui

clean:
	rm -rf artifacts checkpoints .presto .mlflow .prefect
