# iotfleet — two commands for a newcomer on a fresh Debian machine:
#   make demo   install what is missing, start the stack and a simulated fleet (foreground, Ctrl-C stops)
#   make test   install what is missing, then ruff, mypy and the whole test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.iotfleet-installed
DEMO_DEVICES ?= 40
# Test files run in parallel, one file per worker at a time (a file shares its servers between its
# tests). Most of a test's time is spent waiting on brokers and databases, so 3 workers beat 2 on
# a 2-core machine; TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 3

.PHONY: demo test deps system-deps venv lint bench clean

demo: deps
	@echo "==> starting the stack and a simulated fleet of $(DEMO_DEVICES) devices (Ctrl-C stops everything)"
	$(VENV)/bin/iotfleet demo --devices $(DEMO_DEVICES)

test: deps lint
	@echo "==> running the test suite on $(TEST_WORKERS) workers (real mosquitto and influxd on free ports)"
	$(VENV)/bin/pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=20

lint: deps
	@echo "==> ruff"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@echo "==> mypy"
	$(VENV)/bin/mypy

bench: deps
	@echo "==> running every benchmark on a freshly started stack (about 17 minutes); writes docs/benchmarks.md"
	IOTFLEET_BENCH_VIA_MAKE=1 $(VENV)/bin/iotfleet bench

deps: system-deps venv

system-deps:
	@bash scripts/install-system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml mosquitto/plugin/iotfleet_devices.c
	@echo "==> creating $(VENV) and installing iotfleet with its dev tools (pip)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .iotfleet .pytest_cache .mypy_cache .ruff_cache
