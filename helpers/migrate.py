"""The Alembic project of chapter 06, run from Python, and squawk's verdicts on the SQL it really sends.

``alembic_config(engine)`` points the project in ``migrations/`` at a database. ``revision_sql``
upgrades a (scratch) database one revision at a time and keeps, per revision, every statement the
revisions sent, rendered with their parameters (what the server received, not what
``alembic --sql`` would print). ``squawk(sql)`` runs the squawk linter (``squawk-cli``, installed
in the venv) on a script and returns one row per finding.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psycopg
from sqlalchemy import Engine, event

from .config import REPO_ROOT

_SET_CONFIG = re.compile(r"^SELECT set_config\('(lock_timeout|statement_timeout)', '([^']*)', (true|false)\)$", re.I)


def alembic_config(engine: Engine, **attributes):
    """An Alembic Config for the project in ``migrations/``, pointed at the database of ``engine``.

    ``attributes`` go to ``config.attributes`` (read by env.py and the revisions: ``lock_timeout``,
    ``lock_attempts``, ``batch_size``, ``progress``, ``connection``).
    """
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "migrations" / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.attributes["url"] = engine.url.render_as_string(hide_password=False)
    cfg.attributes.update(attributes)
    return cfg


def revision_sql(engine: Engine, revisions: list[str] | None = None) -> dict[str, str]:
    """Upgrade the database of ``engine`` revision by revision; revision -> the SQL script it sent.

    Each statement is rendered with its parameters bound (psycopg's client-side rendering) and ends
    with ``;``. Left out: every ``SELECT`` (Alembic's bookkeeping, the revisions' questions about
    ranges and catalogs: they take no lock that matters) and ``alembic_version``. The lock policy's
    ``SELECT set_config('lock_timeout', v, ...)`` (``helpers.bounded``) is written as the
    equivalent ``SET lock_timeout = v``, the form squawk recognises.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine)
    order = [r.revision for r in reversed(list(ScriptDirectory.from_config(cfg).walk_revisions()))]
    scripts: dict[str, str] = {}
    with engine.connect() as conn:
        sent: list[str] = []

        def capture(conn_, cursor, statement, parameters, context, executemany):
            raw = cursor.connection
            text_ = psycopg.ClientCursor(raw).mogrify(statement, parameters or None) if parameters else statement
            text_ = text_.strip().rstrip(";")
            setting = _SET_CONFIG.match(text_)
            if setting:
                name, value, local = setting.groups()
                sent.append(f"SET {'LOCAL ' if local.lower() == 'true' else ''}{name} = '{value}';")
            elif not text_.lower().startswith("select") and "alembic_version" not in text_.lower():
                sent.append(text_ + ";")

        event.listen(conn, "before_cursor_execute", capture)
        cfg.attributes["connection"] = conn
        for rev in revisions or order:
            sent.clear()
            command.upgrade(cfg, rev)
            scripts[rev] = "\n".join(sent) + "\n"
        event.remove(conn, "before_cursor_execute", capture)
    return scripts


def squawk_path() -> str | None:
    """The squawk executable of this venv (``squawk-cli``), else one on PATH, else None."""
    here = Path(sys.executable).with_name("squawk")
    return str(here) if here.exists() else shutil.which("squawk")


def squawk(script: str, pg_version: str = "15.0", exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    """squawk's findings on ``script`` (SQL text): one row per finding (statement, rule, message).

    ``pg_version`` is the oldest server the workbook supports: a rule that depends on the version
    judges for that one. ``statement`` is the text of the statement the finding points at.
    """
    exe = squawk_path()
    if exe is None:
        raise FileNotFoundError("squawk is not installed: .venv/bin/pip install squawk-cli")
    cmd = [exe, "--reporter", "json", "--pg-version", pg_version, "--no-error-on-unmatched-pattern"]
    if exclude:
        cmd.append("--exclude=" + ",".join(exclude))
    out = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    lines = script.splitlines()
    rows = [
        {
            "statement": lines[f["line"]].strip() if f["line"] < len(lines) else "",
            "rule": f["rule_name"],
            "message": f["message"],
        }
        for f in findings
    ]
    return pd.DataFrame(rows, columns=["statement", "rule", "message"])
