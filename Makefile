# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv/ and install requirements.txt into it on first use.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

.PHONY: test
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
