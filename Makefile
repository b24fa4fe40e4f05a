# Two commands do all their own set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean browser lock

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m orchestrator baseline --workload digits
	$(PY) search.py --workload digits --num-trials 32 --storage-path runs

# Headless Chromium renders report.html in the tests; installed from Debian's packages when we can.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the report rendering test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	  else echo "note: chromium is not installed; the report rendering tests will be skipped"; fi; }

# Test files run side by side in TEST_WORKERS processes (pytest-xdist, one file per process at a time, so a
# file's fixtures are built once; in the order tests/conftest.py gives, longest first, not xdist's by test count):
# most slow tests wait on a search's processes more than they compute.
TEST_WORKERS ?= 3

test: $(STAMP) browser
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Everything not marked slow (no Ray searches, no benchmarks): a few minutes.
test-fast: $(STAMP)
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check orchestrator techniques tests bench search.py
	$(PY) -m ruff format --check orchestrator techniques tests bench search.py
	$(PY) -m mypy

# Re-pin every package from what a fresh venv installs for pyproject.toml (on purpose, then run make test).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	{ sed -n 1,2p constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
