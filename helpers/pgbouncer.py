"""PgBouncer in front of the workbook's server, started and stopped by the workbook.

``pgbouncer_available()`` says whether a PgBouncer can be used (and how to get one when not);
``PgBouncer.start(...)`` runs one in the foreground on a free local port with its config and auth
file in a private temp folder; ``.stop()`` (or leaving ``with PgBouncer.start()``) ends it.
``WORKBOOK_PGBOUNCER_URL`` names a PgBouncer that runs already (the ``pgbouncer`` service of
docker-compose.yml, or any other in front of the workbook database): ``PgBouncer.attach()`` uses it
and never stops it, and ``start_or_attach(...)`` picks that one when the variable is set. PgBouncer refuses to run as root, so as root it runs as the server's unprivileged user
``qowb`` and dies with the Python process that started it (parent-death signal), so a crashed
notebook leaves nothing listening.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

from .config import SERVER_USER, WorkbookError, is_root
from .database import database_url
from .processes import die_with_parent, free_port

URL_VARIABLE = "WORKBOOK_PGBOUNCER_URL"
INSTALL_HINT = (
    "PgBouncer is not installed here. Install it with `apt-get install pgbouncer` (Debian/Ubuntu) or "
    "`brew install pgbouncer` (macOS), or point WORKBOOK_PGBOUNCER_URL at a PgBouncer that runs in front of "
    "the workbook database (e.g. the `pgbouncer` service of docker-compose.yml: "
    "postgresql://workbook:workbook@127.0.0.1:56432/workbook, with that user in its admin_users); "
    "then re-run this section."
)
PREPARED_TRACKING_SINCE = (1, 21)  # max_prepared_statements: protocol-level prepared statements in transaction mode


def pgbouncer_binary() -> str | None:
    """Path of the pgbouncer executable (PATH, then /usr/sbin), or None."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin:/usr/bin")


def pgbouncer_version(binary: str | None = None) -> tuple[int, int, int] | None:
    """(major, minor, patch) of the installed PgBouncer, from ``pgbouncer --version``; None if absent."""
    binary = binary or pgbouncer_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise WorkbookError(f"Cannot read PgBouncer's version from {out!r}.")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def pgbouncer_url() -> URL | None:
    """The PgBouncer named by ``WORKBOOK_PGBOUNCER_URL`` (read from the environment on each call), or None."""
    from sqlalchemy.engine import make_url

    raw = os.environ.get(URL_VARIABLE, "").strip()
    if not raw:
        return None
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if not url.username or not url.database:
        raise WorkbookError(f"{URL_VARIABLE} needs a user and a database: postgresql://user:password@host:port/db")
    return url


def pgbouncer_available() -> tuple[bool, str]:
    """(usable?, a sentence: which PgBouncer, or how to get one)."""
    url = pgbouncer_url()
    if url is not None:
        return True, f"the PgBouncer at {url.host or '127.0.0.1'}:{url.port or 6432} ({URL_VARIABLE})"
    version = pgbouncer_version()
    if version is None:
        return False, INSTALL_HINT
    return True, f"PgBouncer {'.'.join(map(str, version))} at {pgbouncer_binary()}"


def tracks_prepared_statements(version: tuple[int, int, int]) -> bool:
    """True from PgBouncer 1.21, whose ``max_prepared_statements`` makes psycopg's prepared statements safe."""
    return version[:2] >= PREPARED_TRACKING_SINCE


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@dataclass
class PgBouncer:
    """A running PgBouncer: ``url()`` for clients, ``admin()`` for its console, ``stop()`` to end it.

    ``external``: attached through ``WORKBOOK_PGBOUNCER_URL`` (``server`` is then that URL); never stopped here.
    """

    process: subprocess.Popen | None
    port: int
    workdir: Path | None
    version: tuple[int, int, int]
    pool_mode: str
    pool_size: int
    server: URL
    settings: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    external: bool = False

    @classmethod
    def attach(cls, url: URL | None = None) -> PgBouncer:
        """The PgBouncer at ``url`` (default: ``WORKBOOK_PGBOUNCER_URL``): its version and settings read from its console."""
        url = url or pgbouncer_url()
        if url is None:
            raise WorkbookError(f"{URL_VARIABLE} is not set. {INSTALL_HINT}")
        bouncer = cls(None, url.port or 6432, None, (0, 0, 0), "", 0, url, host=url.host or "127.0.0.1", external=True)
        try:
            config = bouncer.show("CONFIG")
            banner = str(bouncer.show("VERSION").iloc[0, 0])
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise WorkbookError(
                f"The PgBouncer at {bouncer.host}:{bouncer.port} ({URL_VARIABLE}) does not let {url.username!r} "
                f"read its console (SHOW CONFIG): add that user to its admin_users. ({first})"
            ) from None
        match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", banner)
        if not match:
            raise WorkbookError(f"Cannot read PgBouncer's version from {banner!r}.")
        bouncer.version = (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
        bouncer.settings = dict(zip(config["key"], config["value"], strict=True))
        bouncer.pool_mode = bouncer.settings.get("pool_mode", "")
        bouncer.pool_size = int(bouncer.settings.get("default_pool_size", 0))
        return bouncer

    @property
    def tracks_prepared(self) -> bool:
        """Whether protocol-level prepared statements survive transaction mode here (1.21+, max_prepared_statements > 0)."""
        return tracks_prepared_statements(self.version) and int(self.settings.get("max_prepared_statements", 0)) > 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 2,
        max_client_conn: int = 100,
        max_prepared_statements: int | None = None,
        server: URL | None = None,
        extra: dict | None = None,
        ready_timeout_s: float = 10.0,
    ) -> PgBouncer:
        """Start PgBouncer against ``server`` (default: the workbook database) on a free port; wait until it answers."""
        binary = pgbouncer_binary()
        if binary is None:
            raise WorkbookError(INSTALL_HINT)
        version = pgbouncer_version(binary)
        server = server or database_url()
        if not server.password or not server.username:
            raise WorkbookError("PgBouncer needs the server's user name and password in the URL to authenticate.")
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="wb-pgbouncer-"))
        conf = {
            "listen_addr": "127.0.0.1",
            "listen_port": port,
            "unix_socket_dir": "",  # no socket file in /tmp to collide with others
            "auth_type": "scram-sha-256",
            "auth_file": str(workdir / "userlist.txt"),
            "admin_users": server.username,
            "stats_users": server.username,
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": max_client_conn,
            "server_lifetime": 3600,
            "server_idle_timeout": 600,
            "ignore_startup_parameters": "extra_float_digits,options",
            "logfile": str(workdir / "pgbouncer.log"),
            "pidfile": str(workdir / "pgbouncer.pid"),
            "log_connections": 0,
            "log_disconnections": 0,
        }
        if max_prepared_statements is not None:
            if not tracks_prepared_statements(version):
                raise WorkbookError(
                    f"max_prepared_statements needs PgBouncer 1.21 or later; this is {'.'.join(map(str, version))}. "
                    "Turn psycopg's prepared statements off instead: connect_args={'prepare_threshold': None}."
                )
            conf["max_prepared_statements"] = max_prepared_statements
        conf.update(extra or {})
        dbline = f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}"
        ini = "[databases]\n" + dbline + "\n\n[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
        (workdir / "pgbouncer.ini").write_text(ini)
        (workdir / "userlist.txt").write_text(f"{_quote(server.username)} {_quote(server.password)}\n")
        kw: dict = {}
        if is_root():
            import pwd

            pw = pwd.getpwnam(SERVER_USER)
            for path in [workdir, *workdir.iterdir()]:
                os.chown(path, pw.pw_uid, pw.pw_gid)
            kw = {"user": SERVER_USER, "group": SERVER_USER, "extra_groups": []}
        for path in workdir.iterdir():
            path.chmod(0o600)
        workdir.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        process = subprocess.Popen(
            [binary, str(workdir / "pgbouncer.ini")],
            cwd=str(workdir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            **kw,
        )
        bouncer = cls(process, port, workdir, version, pool_mode, pool_size, server, conf)
        atexit.register(bouncer.stop)
        try:
            bouncer._wait_ready(ready_timeout_s)
        except BaseException:
            bouncer.stop()
            raise
        return bouncer

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise WorkbookError(f"PgBouncer exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with self.admin():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise WorkbookError(
                        f"PgBouncer did not answer within {timeout_s:.0f}s: {self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer (SIGINT: immediate shutdown, server connections closed) and remove its folder.

        An attached PgBouncer (``external``) is not ours: it is left running.
        """
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """True while the PgBouncer this object started runs (False for an attached one: not ours to run)."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def url(self, database: str | None = None, **query: str) -> URL:
        """SQLAlchemy URL of ``database`` (default: the server's) through this PgBouncer."""
        return self.server.set(
            host=self.host,
            port=self.port,
            database=database or self.server.database,
            query={**dict(self.server.query), **query},
        )

    def conninfo(self, database: str | None = None, **kw) -> dict:
        """Keyword arguments for ``psycopg.connect`` through this PgBouncer."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.server.username,
            "password": self.server.password,
            "dbname": database or self.server.database,
            "connect_timeout": 5,
            **kw,
        }

    def admin(self) -> psycopg.Connection:
        """A connection to PgBouncer's admin console (database ``pgbouncer``; simple query protocol)."""
        return psycopg.connect(**self.conninfo("pgbouncer"), autocommit=True, cursor_factory=psycopg.ClientCursor)

    def show(self, what: str) -> pd.DataFrame:
        """``SHOW POOLS`` / ``SERVERS`` / ``CLIENTS`` / ``STATS`` ... from the admin console, as a DataFrame."""
        if not re.fullmatch(r"[A-Za-z_]+", what):
            raise ValueError(f"not a SHOW command of PgBouncer: {what!r}")
        with self.admin() as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SHOW {}").format(sql.SQL(what.upper())))  # a keyword checked above, not a value
            cols = [d.name for d in cur.description]
            return pd.DataFrame(cur.fetchall(), columns=cols)

    def connection_counts(self, database: str | None = None) -> dict:
        """Client and server connections of ``database``'s pools right now (admin console excluded)."""
        db = database or self.server.database
        clients = self.show("CLIENTS")
        servers = self.show("SERVERS")
        return {
            "clients": int((clients["database"] == db).sum()),
            "servers": int((servers["database"] == db).sum()),
            "server_pids": sorted(int(p) for p in servers.loc[servers["database"] == db, "remote_pid"]),
        }

    def log_tail(self, n: int = 10) -> str:
        """The last lines of PgBouncer's log."""
        if self.workdir is None:
            return "(no log: an attached PgBouncer)"
        try:
            return "\n".join((self.workdir / "pgbouncer.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def start_or_attach(**start_kw) -> PgBouncer:
    """The PgBouncer of ``WORKBOOK_PGBOUNCER_URL`` when it is set, else one started here with ``start_kw``."""
    if pgbouncer_url() is not None:
        return PgBouncer.attach()
    return PgBouncer.start(**start_kw)
