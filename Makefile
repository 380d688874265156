# Entry points for a fresh machine: `make quickstart`, `make test` (the edit-test loop) and `make test-all`.
# Both create .venv/ and install requirements.txt into it on first use.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

# the whole method end to end on CPU (about 14 minutes on 2 cores, the install included; see README):
# world and pretrained backbones, P-Former stage 0, stages 1 and 2 with and without P-Former, zero-shot VQA and captioning,
# table and pictures
.PHONY: quickstart
quickstart: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) quickstart.py

# the edit-test loop: every test but those marked slow (pytest.ini: whole pipelines, several processes)
.PHONY: test
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" --durations=10 tests

# the whole suite, slow tests included, as CI runs it
.PHONY: test-all
test-all: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=10 tests
