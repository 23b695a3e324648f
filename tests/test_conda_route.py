"""The conda route: ``make`` runs in an environment made elsewhere, installs nothing into it, and says
what to do when it lacks the lock's pins.

Conda cannot be installed here, so the environment "made elsewhere" is a venv outside the checkout
whose site-packages reach the checkout's .venv (what `conda env create -f environment.yml` would have
installed): the mechanism under test is the same one, ``VENV=<prefix>`` or an activated environment
named ``qo-workbook``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env_made_elsewhere(root: Path, *, with_packages: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    if with_packages:
        site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        (site / "lock.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYTHONPATH")}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, env={**base, **(env or {})}, text=True, capture_output=True
    )


@pytest.fixture
def elsewhere(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run outside a venv")
    return _env_made_elsewhere(tmp_path / "env", with_packages=True)


def test_make_uses_an_environment_passed_as_venv_and_installs_nothing_into_it(elsewhere):
    before = sorted(p.name for p in elsewhere.rglob("*"))
    ok = _make("venv", f"VENV={elsewhere}")
    assert ok.returncode == 0, ok.stderr
    planned = _make("-n", "run", f"VENV={elsewhere}").stdout
    assert f"{elsewhere}/bin/python -m helpers run" in planned
    assert "pip install" not in planned and ".venv/bin/python" not in planned
    # the checkout is on PYTHONPATH, not written into the environment: helpers imports from it
    status = _make("db-status", f"VENV={elsewhere}")
    # the embedded server says "running", a server of your own (DATABASE_URL) "reachable"
    assert status.returncode == 0 and ('"running": true' in status.stdout or '"reachable": true' in status.stdout), (
        status.stdout + status.stderr
    )
    assert sorted(p.name for p in elsewhere.rglob("*")) == before


def test_an_activated_conda_environment_named_qo_workbook_is_detected(elsewhere):
    planned = _make("-n", "run", env={"CONDA_PREFIX": str(elsewhere), "CONDA_DEFAULT_ENV": "qo-workbook"}).stdout
    assert f"{elsewhere}/bin/python -m helpers run" in planned
    other = _make("-n", "run", env={"CONDA_PREFIX": str(elsewhere), "CONDA_DEFAULT_ENV": "base"}).stdout
    assert f"{elsewhere}/bin/python" not in other and ".venv/bin/python -m helpers run" in other


def test_an_environment_without_the_pins_gets_a_short_message_saying_what_to_run(tmp_path):
    bare = _env_made_elsewhere(tmp_path / "bare", with_packages=False)
    out = _make("venv", f"VENV={bare}")
    assert out.returncode != 0
    message = [line for line in out.stderr.splitlines() if not line.startswith("make:")]
    assert len(message) <= 3 and "conda env update -f environment.yml" in out.stderr
    missing = _make("venv", f"VENV={tmp_path / 'nowhere'}")
    assert missing.returncode != 0 and "no " in missing.stdout + missing.stderr
