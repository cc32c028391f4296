"""Real-browser tests: JupyterLab in headless Chromium, driven by Playwright.

They need Debian's `chromium` (/usr/bin/chromium; Playwright's own browser download cannot work offline)
and the `browser` extra (`pip install -e ".[test,browser]"`). Without them they are skipped with the
reason, unless DREAMBOOTH_NB_REQUIRE_BROWSER=1 (set by .ci/run): then a missing piece fails the test.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (tests/browser/)")
