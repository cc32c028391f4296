# `make demo` and `make test` work on a fresh Linux machine with only Python >= 3.10 installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The tests and the demo run on CPU. torch==2.13.0 resolves to the CPU wheel on this project's machines;
# override TORCH (e.g. TORCH=torch) elsewhere. The package itself never pins torch.
TORCH ?= torch==2.13.0

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	TQDM_DISABLE=1 $(PY) -m pytest -q

demo: install
	$(PY) -m dreambooth_nb.demo --out demo-output

clean:
	rm -rf $(VENV) demo-output .pytest_cache
