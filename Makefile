# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv/ and install requirements.txt into it on first use.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

# the tiny world, then stage 1 and stage 2 on it, on CPU
.PHONY: quickstart
quickstart: $(VENV)/.installed
	test -f data/world/vit.pth || HF_HUB_OFFLINE=1 $(PY) world.py
	HF_HUB_OFFLINE=1 $(PY) train_stage1.py config/stage1_tiny.py
	HF_HUB_OFFLINE=1 $(PY) train_stage2.py config/stage2_tiny.py

.PHONY: test
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
