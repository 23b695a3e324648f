"""The browser tests run only when asked for by marker (``make test-browser``: ``pytest -m browser tests/browser``).

``pytest tests`` and ``make test`` deselect them: they need Debian's chromium and take minutes.
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    if "browser" in (config.option.markexpr or ""):
        return
    keep = [i for i in items if i.get_closest_marker("browser") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("browser") is not None])
        items[:] = keep
