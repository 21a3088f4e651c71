# SmartNodule: every target installs what it needs itself (venv, pip pins, Debian peers when root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBS := dcmtk orthanc poppler-utils dicom3tools chromium
export TCP_NODELAY := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test bench gpu-check system-packages clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

system-packages:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; fi; \
	fi

demo: system-packages $(STAMP)
	$(VENV)/bin/smartnodule demo $(ARGS)

test: system-packages $(STAMP)
	$(PY) -m pytest -rs tests

bench: system-packages $(STAMP)
	$(PY) -m bench.e2e --n 5

gpu-check: $(STAMP)
	$(PY) -m inference.gpu_check

clean:
	rm -rf $(VENV) var test-output
