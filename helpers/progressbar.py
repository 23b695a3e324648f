"""Progress for the slow cells: a bar in JupyterLab, one line in a headless run.

``progress(iterable, desc=..., unit=...)`` (or ``progress(total=N, ...)`` with ``.update(n)``) is a
``tqdm.auto`` bar in a kernel with a frontend: an ipywidgets progress bar in JupyterLab. In a
headless run (``make run``, ``make test``: the runner and the pytest plugin set
``WORKBOOK_HEADLESS=1`` for the kernels they start) a bar would be saved as its first frame,
"0%", a widget nobody will see move; there it prints one line when done instead:
``backfill: 20,000 rows in 3.1 s``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

HEADLESS_ENV = "WORKBOOK_HEADLESS"


def headless() -> bool:
    """True in the kernels of a headless run (runner, nbmake), where no one watches a bar move."""
    return os.environ.get(HEADLESS_ENV) == "1"


def _plural(unit: str) -> str:
    """English plural of a unit for the one line: "query" -> "queries", "row" -> "rows"."""
    if unit.endswith("y") and unit[-2:-1] not in ("a", "e", "o", "u"):
        return unit[:-1] + "ies"
    return unit if unit.endswith("s") else unit + "s"


class _Line:
    """tqdm's small interface (iterate, ``update``, ``close``, ``with``), printing one line at the end."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, quiet: bool = False) -> None:
        self.iterable, self.total, self.desc, self.unit, self.quiet = iterable, total, desc, unit, quiet
        self.n, self._t0, self._closed = 0, time.perf_counter(), False

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.n += 1
        self.close()

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else (self.total or 0)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args, **kwargs) -> None:  # tqdm's; nothing to redraw here
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.quiet:
                return
            unit = self.unit if self.n == 1 else _plural(self.unit)
            print(f"{self.desc}: {self.n:,} {unit} in {time.perf_counter() - self._t0:.1f} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
):
    """A progress bar (JupyterLab) or one closing line (headless runs) over ``iterable`` or ``total`` steps.

    ``disable=True``: neither (a helper whose caller asked for no progress).
    """
    if disable:
        return _Line(iterable, total, desc, unit, quiet=True)
    if headless():
        return _Line(iterable, total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit)
