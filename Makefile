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

# Two pytest workers (pytest-xdist): every test process runs one thread (tests/conftest.py), so two use a
# 2-core machine fully (8.6 min, about half the time of one process). `--dist loadfile` keeps each file in
# one worker, where its module fixtures (the notebook suite runs notebooks 1→6 in order) are built once.
# TEST_WORKERS=0: one process, the default when OMP_NUM_THREADS asks for more than one thread per process
# (two workers spinning two OpenMP threads each on two cores slow everything down).
TEST_WORKERS ?= $(if $(filter-out 1,$(OMP_NUM_THREADS)),0,2)
test: install
	TQDM_DISABLE=1 $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The real-browser test alone (tests/browser/: JupyterLab in headless Chromium via Playwright, ~1.5 min).
# It is also collected by `make test`, which skips it, saying why, where Debian's chromium or the `browser`
# extra is missing: the README's command stays Python-only. `.ci/run` installs both and sets
# DREAMBOOTH_NB_REQUIRE_BROWSER=1, so in CI it runs inside `make test` or fails, never skips; this target
# does the same for one machine. Chromium is Debian's (root: apt-get install chromium); Playwright's own
# browser download (`playwright install`) cannot work offline.
.PHONY: test-browser
test-browser: install
	@test -x /usr/bin/chromium || { echo "make test-browser: /usr/bin/chromium is missing: apt-get install -y chromium" >&2; exit 1; }
	$(PY) -m pip install -q -e ".[test,browser]"
	DREAMBOOTH_NB_REQUIRE_BROWSER=1 TQDM_DISABLE=1 $(PY) -m pytest -q tests/browser

demo: install
	$(PY) -m dreambooth_nb.notebook.demo --out demo-output

clean:
	rm -rf $(VENV) demo-output .pytest_cache
