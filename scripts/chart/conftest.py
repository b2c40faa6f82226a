"""The chart tests' one shared set-up: the closing line scripts/test.sh's summary reads.

Run by scripts/test-chart.sh, which puts the pinned helm and kubernetes-validate first on PATH
(see chart.py for the rendering helpers every test file imports).
"""

import pytest

pytest.register_assert_rewrite("chart")


def pytest_unconfigure(config):
    """After pytest's own summary, one line `chart: N passed, M failed` (errors in set-up count as
    failures), the format scripts/test.sh adds up. Only the controlling process prints it."""
    if hasattr(config, "workerinput"):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    passed = len([r for r in reporter.stats.get("passed", []) if r.when == "call"])
    failed = len({r.nodeid for key in ("failed", "error") for r in reporter.stats.get(key, [])})
    reporter.write_line(f"chart: {passed} passed, {failed} failed")
