"""Writing ``output/results/<topic>.json`` at the repository root, from measured values only."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

from .config import output_dir, settings

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


def record(topic: str, data: dict) -> Path:
    """Write ``output/results/<topic>.json`` (replacing it) with ``data`` plus a ``meta`` key."""
    if not _TOPIC.match(topic):
        raise ValueError(f"topic must be lower-case letters, digits and underscores: {topic!r}")
    if not isinstance(data, dict):
        raise TypeError("record() takes a dict of measured values")
    payload = _plain(dict(data))
    payload["meta"] = _meta()
    path = output_dir("results") / f"{topic}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
