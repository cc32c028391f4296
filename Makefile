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
	$(PY) -m dreambooth_nb.demo --out demo-output

clean:
	rm -rf $(VENV) demo-output .pytest_cache
