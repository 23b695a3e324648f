"""Writing ``output/results/<topic>.json`` at the repository root, from measured values only."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

from .config import WorkbookError, output_dir, settings, write_whole

_TOPIC = re.compile(r"^[a-z0-9_]+$")


def _plain(value):
    """JSON-able copy: numpy scalars, pandas objects, Decimals, paths, NaN (-> null)."""
    import decimal

    import numpy as np
    import pandas as pd

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return _plain(value.to_dict(orient="records"))
    if isinstance(value, pd.Series):
        return _plain(value.to_dict())
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def _commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), or None outside git."""
    import subprocess

    from .config import REPO_ROOT

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _meta() -> dict:
    """Where these results come from: scale, server, machine, commit and time."""
    import os
    import platform

    meta = {
        "scale": settings().scale,
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "commit": _commit(),
    }
    try:
        from sqlalchemy import text

        from .database import get_engine, is_embedded

        with get_engine().connect() as conn:
            meta["server_version"] = conn.execute(text("SHOW server_version")).scalar()
        meta["database"] = "embedded" if is_embedded() else "DATABASE_URL"
    except Exception as exc:  # noqa: BLE001 - meta must never hide the results
        meta["server_version"] = f"unknown ({type(exc).__name__})"
    return meta


def ordering(values: dict) -> list[str]:
    """The keys of ``values`` from the smallest value to the largest: an ordering to declare as a conclusion.

    Declare only orderings that hold with a wide margin (the chapter asserts them): two runs must agree.
    """
    return [str(k) for k, _ in sorted(values.items(), key=lambda kv: kv[1])]


def record(topic: str, data: dict, conclusions: dict | None = None) -> Path:
    """Write ``output/results/<topic>.json`` (replacing it) with ``data`` plus a ``meta`` key.

    ``conclusions`` holds what the chapter claims, each claim one value that does not vary between
    runs (a boolean, a count, a matrix, an ``ordering``): ``python -m helpers compare-results A B``
    compares two runs on them.
    """
    if not _TOPIC.match(topic):
        raise ValueError(f"topic must be lower-case letters, digits and underscores: {topic!r}")
    if not isinstance(data, dict):
        raise TypeError("record() takes a dict of measured values")
    if conclusions is not None and not isinstance(conclusions, dict):
        raise TypeError("conclusions must be a dict: claim name -> value")
    payload = _plain(dict(data))
    if conclusions is not None:
        payload["conclusions"] = _plain(dict(conclusions))
    payload["meta"] = _meta()
    path = output_dir("results") / f"{topic}.json"
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_whole(path, lambda fh: fh.write(text.encode()))
    return path


def compare_results(a: Path, b: Path) -> list[str]:
    """Every declared conclusion on which two results folders differ (empty: they agree).

    A topic or claim present in one folder only counts as a difference: a run that stopped early
    must not pass for one that agrees.
    """
    a, b = Path(a), Path(b)

    def load(folder: Path) -> dict[str, dict]:
        if not folder.is_dir():
            raise WorkbookError(f"{folder} is not a folder; give two results folders (output/results of two runs).")
        out = {}
        for path in sorted(folder.glob("*.json")):
            out[path.stem] = json.loads(path.read_text()).get("conclusions")
        return out

    left, right = load(a), load(b)
    diffs = []
    for topic in sorted(set(left) | set(right)):
        if topic not in left or topic not in right:
            diffs.append(f"{topic}: only in {a if topic in left else b}")
            continue
        lc, rc = left[topic], right[topic]
        if lc is None or rc is None:
            if lc != rc:
                diffs.append(f"{topic}: conclusions declared in {a if lc is not None else b} only")
            continue
        for claim in sorted(set(lc) | set(rc)):
            if claim not in lc or claim not in rc:
                diffs.append(f"{topic}.{claim}: only in {a if claim in lc else b}")
            elif lc[claim] != rc[claim]:
                diffs.append(f"{topic}.{claim}: {lc[claim]!r} in {a}, {rc[claim]!r} in {b}")
    return diffs
