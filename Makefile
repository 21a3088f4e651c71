# SmartNodule: every target installs what it needs itself (venv, pip pins, Debian peers when root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBS := dcmtk orthanc poppler-utils dicom3tools chromium openssl nodejs postgresql-client prometheus
OHIF := tests/viewers/ohif
OHIF_STAMP := $(OHIF)/node_modules/.installed
export TCP_NODELAY := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test bench faults gpu-check system-packages postgres clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# OHIF's published SR code (npm, pinned by package-lock.json) for tests/viewers; about 25 s, 88 MB.
$(OHIF_STAMP): $(OHIF)/package.json $(OHIF)/package-lock.json $(OHIF)/.npmrc | system-packages
	cd $(OHIF) && npm ci --no-audit --no-fund
	touch $@

system-packages:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; fi; \
	fi

# Tests use a PostgreSQL on 127.0.0.1:5432 (user postgres); start one when none answers.
postgres:
	@if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then echo "PostgreSQL is not answering on 127.0.0.1:5432 (start it, or run as root)"; exit 0; fi; \
	  dpkg -s postgresql >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }; \
	  version=$$(ls /etc/postgresql | sort -n | tail -1); \
	  pg_ctlcluster --skip-systemctl-redirect $$version main start || true; \
	  for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
	  su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\""; \
	fi

demo: system-packages $(STAMP)
	$(VENV)/bin/smartnodule demo $(ARGS)

test: system-packages postgres $(STAMP) $(OHIF_STAMP)
	$(PY) -m pytest -rs tests

bench: system-packages postgres $(STAMP)
	$(PY) -m bench

faults: system-packages postgres $(STAMP)
	$(PY) -m tests.faults.suite

gpu-check: $(STAMP)
	$(PY) -m inference.training.gpu_check

clean:
	rm -rf $(VENV) var test-output $(OHIF)/node_modules
