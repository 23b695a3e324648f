"""Bad settings and a moved checkout (issue 13, item 7): each gives a short message saying what to do,
a non-zero exit, and changes nothing. The embedded-server cases run on state folders of their own."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import REPO, run_helpers

UNREACHABLE = "postgresql+psycopg://someone:secret@127.0.0.1:1/workbook"


def _refused(res: subprocess.CompletedProcess, *phrases: str) -> str:
    err = res.stderr.strip()
    assert res.returncode != 0, f"exit 0 for a bad setting: {res.stdout}{res.stderr}"
    assert "Traceback" not in err and len(err.splitlines()) < 10, err
    for phrase in phrases:
        assert phrase in err, err
    return err


@pytest.fixture
def tmp_root():
    path = Path(tempfile.mkdtemp(prefix="qowb-inputs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("port", ["70000", "-5"])
def test_port_out_of_range(tmp_root, port):
    state = tmp_root / "state"
    res = run_helpers("db", "start", env={"WORKBOOK_STATE": str(state), "WORKBOOK_PORT": port})
    _refused(res, f"WORKBOOK_PORT='{port}'", "65535")
    assert not state.exists(), "nothing may be created for a bad port"


@contextlib.contextmanager
def _read_only_folder(path: Path):
    """A read-only file system (a tmpfs mounted ro) as root, who ignores permission bits; else mode 0555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_state_on_a_read_only_path(tmp_root):
    with _read_only_folder(tmp_root / "ro") as ro:
        res = run_helpers("db", "start", env={"WORKBOOK_STATE": str(ro / "state")})
        err = _refused(res, str(ro), "WORKBOOK_STATE")
        assert "read-only file system" in err or "not writable" in err, err
        assert not any(ro.iterdir())


def test_relative_state_is_refused_with_the_absolute_path_to_use():
    name = "qowb-relative-state-test"
    res = run_helpers("db", "start", env={"WORKBOOK_STATE": name})
    _refused(res, "relative path", f"WORKBOOK_STATE={REPO / name}")
    assert not (REPO / name).exists(), "no folder may be left in the checkout"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_state_the_server_user_cannot_reach(tmp_root):
    tmp_root.chmod(0o755)
    home = tmp_root / "home"  # like /root: mode 0700, owner root
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    res = run_helpers("db", "start", env={"WORKBOOK_STATE": str(home / "workbook")})
    _refused(res, "'qowb'", f"cannot enter {home} (mode 0700, owner root)", f"chmod o+x {home}")
    assert not any(home.iterdir()), "nothing may be created"


def test_empty_workbook_db(tmp_root):
    state = tmp_root / "state"
    res = run_helpers("db", "start", env={"WORKBOOK_STATE": str(state), "WORKBOOK_DB": ""})
    _refused(res, "WORKBOOK_DB is set but empty")
    assert not state.exists(), "the server must not start for a bad WORKBOOK_DB"
    # under DATABASE_URL it must not fall back to the login's own database (nor try to connect)
    res = run_helpers("db", "url", env={"DATABASE_URL": UNREACHABLE, "WORKBOOK_DB": ""})
    err = _refused(res, "WORKBOOK_DB is set but empty")
    assert "Cannot connect" not in err and "secret" not in err


@contextlib.contextmanager
def _listener(reply: bytes):
    """A TCP listener that is not PostgreSQL: it answers every connection with ``reply`` and hangs up."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                with conn:
                    if reply:
                        conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        done.set()
        thread.join()
        srv.close()


@pytest.mark.parametrize(
    "what", ["unresolvable host", "listener that hangs up", "HTTP server"], ids=["dns", "hangup", "http"]
)
def test_host_that_does_not_resolve_or_is_not_postgres(what):
    reply = b"HTTP/1.0 400 Bad Request\r\n\r\n" if what == "HTTP server" else b""
    with _listener(reply) as port:
        host = "no-such-host.invalid" if what == "unresolvable host" else f"127.0.0.1:{port}"
        res = run_helpers("db", "status", env={"DATABASE_URL": f"postgresql://someone:secret@{host}/workbook"})
    expected = "does not resolve" if what == "unresolvable host" else "did not answer as a PostgreSQL server"
    err = _refused(res, expected)
    assert "message above" not in err and "secret" not in err


def test_bogus_scale_blocks_only_what_needs_a_scale(tmp_root):
    state = tmp_root / "state"
    env = {"WORKBOOK_STATE": str(state), "WORKBOOK_SCALE": "bogus"}
    res = run_helpers("db", "stop", env=env)
    assert res.returncode == 0 and res.stdout.strip() == "not running", res.stderr
    _refused(run_helpers("seed", env=env), "WORKBOOK_SCALE='bogus'", "ci, small, large")
    assert not state.exists(), "neither stop nor a refused seed may create or start anything"


# ----------------------------------------------------------------------------- a copied checkout
def _make(cwd: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBOOK_", "VIRTUAL_ENV"))}
    env["HOME"] = str(cwd)  # pip's cache of the user who runs make
    kw = {"user": user, "group": user, "extra_groups": []} if user else {}
    # /usr/bin/python3 rather than this test's Python, which may live where another user cannot go (/root)
    cmd = ["make", "--no-print-directory", "PYTHON=/usr/bin/python3", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


def _pth(checkout: Path) -> str:
    return next(checkout.glob(".venv/lib/python3*/site-packages/qo_workbook.pth")).read_text().strip()


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
def test_a_copied_checkout_rebuilds_its_venv(tmp_root):
    """``cp -a`` of a checkout, then ``make``: the copy gets a venv of its own (qo_workbook.pth naming the
    copy, scripts starting the copy's Python), for the same user and for another one."""
    tmp_root.chmod(0o755)
    first = tmp_root / "first"
    first.mkdir()
    shutil.copy(REPO / "Makefile", first)
    shutil.copy(REPO / "pyproject.toml", first)
    (first / "requirements.lock").write_text("# nothing: this test is about the venv's place\n")
    res = _make(first, "venv")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _pth(first) == str(first)
    assert _make(first, "-q", "venv").returncode == 0, "an unchanged checkout must be up to date"

    copy = tmp_root / "copy"
    subprocess.run(["cp", "-a", str(first), str(copy)], check=True)
    assert _make(copy, "-q", "venv").returncode == 1, "a copied checkout must not trust the copied venv"
    res = _make(copy, "venv")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "built for another checkout path or user" in res.stdout
    assert _pth(copy) == str(copy) and _pth(first) == str(first)
    assert (copy / ".venv/bin/pip").read_text().splitlines()[0] == f"#!{copy}/.venv/bin/python"
    assert (copy / ".venv/.installed").read_text().strip() == f"{copy} uid={os.geteuid()}"

    if os.geteuid() != 0:
        return
    # another user (the server's, qowb) copies it: its own venv, not root's
    home = tmp_root / "qowb"
    home.mkdir()
    shutil.chown(home, "qowb", "qowb")
    theirs = home / "theirs"
    res = subprocess.run(["cp", "-a", str(copy), str(theirs)], user="qowb", group="qowb", extra_groups=[])
    assert res.returncode == 0
    assert (theirs / ".venv").stat().st_uid != 0, "cp -a by another user makes the copy theirs"
    res = _make(theirs, "venv", user="qowb")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "built for another checkout path or user" in res.stdout
    assert _pth(theirs) == str(theirs)
    run = subprocess.run(
        [str(theirs / ".venv/bin/python"), "-c", "import sys; print(sys.prefix)"],
        user="qowb",
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.strip() == str(theirs / ".venv"), run.stderr
