# The two commands of the README: `make quickstart` (the whole job on the default model) and `make test`.
PYTHON ?= python3

.PHONY: install quickstart test

install:
	PYTHON=$(PYTHON) bash install.sh

quickstart:
	PYTHON=$(PYTHON) bash install.sh
	$(PYTHON) quickstart.py

test:
	PYTHON=$(PYTHON) bash install.sh --dev
	$(PYTHON) -m pytest tests -q
