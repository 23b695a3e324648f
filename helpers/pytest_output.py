"""A pytest plugin (loaded by pyproject's addopts): every pytest run (``make test``, nbmake, a single test) writes its artifacts into a scratch folder.

``output/`` belongs to ``make run``: one run, one set of artifacts. Notebooks executed under nbmake
inherit ``WORKBOOK_OUTPUT`` from this process, so their plots and results land in the scratch
folder too. Set ``WORKBOOK_OUTPUT`` yourself to keep a test run's artifacts somewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN: list[str] = []


def pytest_configure(config):
    # kernels nbmake starts are headless: progress() prints one line there instead of a widget's first frame
    os.environ.setdefault("WORKBOOK_HEADLESS", "1")
    if "WORKBOOK_OUTPUT" not in os.environ:
        path = tempfile.mkdtemp(prefix="wb-test-output-")
        os.environ["WORKBOOK_OUTPUT"] = path
        _OWN.append(path)


def pytest_unconfigure(config):
    for path in _OWN:
        shutil.rmtree(path, ignore_errors=True)
