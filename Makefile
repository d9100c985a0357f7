# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Each creates its own virtual environment in $(VENV) the first time.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Pinned so that a fresh machine gets a torch/torchvision pair known to work together with timm.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RUN ?= runs/demo

.PHONY: install demo test test-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/wsi2dmamba demo --out $(RUN)

test: install
	$(VENV)/bin/ruff check wsi2dmamba tests benchmarks
	$(VENV)/bin/python -m pytest -q

test-gpu: install
	$(VENV)/bin/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
