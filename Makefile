# The two commands of the README: `make quickstart` (the whole job on the default model) and `make test`.
# Both install into a virtual environment of their own, .venv (made on first use), from the lock: exactly what CI
# tested. PYTHON=/path/to/python make ... installs into that interpreter's environment instead.
PYTHON ?= .venv/bin/python

.PHONY: venv install quickstart test test-latest lock

venv:
	@if [ "$(PYTHON)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then \
		echo "make: creating the virtual environment .venv"; python3 -m venv .venv; fi

install: venv
	PYTHON=$(PYTHON) bash install.sh

quickstart: venv
	PYTHON=$(PYTHON) bash install.sh
	$(PYTHON) quickstart.py

# On every core (pytest-xdist): whole files go to the workers (a module fixture is set up once), the longest first
# (tests/conftest.py's LONGEST_FIRST). PYTEST_FLAGS="-n 0" runs it in one process.
test: venv
	PYTHON=$(PYTHON) bash install.sh --dev
	$(PYTHON) -m pytest tests -q -n auto --dist loadfile --no-loadscope-reorder $(PYTEST_FLAGS)

# The suite on the newest releases that requirements*.txt allow, in its own environment (.venv-latest), so that we
# meet a new release before our users do. It never touches the lock.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	MINITRAIN_LATEST=1 PYTHON=.venv-latest/bin/python bash install.sh --dev
	.venv-latest/bin/python -m pytest tests -q -n auto --dist loadfile --no-loadscope-reorder

# Re-resolve the locks (pip-tools; run on Linux x86-64, Python 3.11, with pip seeing torch's CPU build). The pins after
# -P are held back on purpose; install.sh and docs/install.md say why.
LOCK_PINS = -P torch==2.13.0 -P triton==3.7.1 -P bitsandbytes==0.49.2
LOCK_FLAGS = --quiet --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url $(LOCK_PINS)
lock:
	$(PYTHON) -m pip install --quiet pip-tools==7.7.0
	CUSTOM_COMPILE_COMMAND="make lock" $(PYTHON) -m piptools compile $(LOCK_FLAGS) -o requirements-dev.lock requirements.txt requirements-dev.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(PYTHON) -m piptools compile $(LOCK_FLAGS) -c requirements-dev.lock -o requirements.lock requirements.txt
