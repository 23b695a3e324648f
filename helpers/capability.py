"""What this server and this role allow, and one way for a chapter to skip what they do not.

A chapter runs on the embedded server (superuser, pg_stat_statements and auto_explain preloaded), on a
stock PostgreSQL of your own (nothing preloaded), or on a shared training server as a role without
superuser, perhaps without CREATEDB. Instead of special cases in every notebook, a section asks::

    if have("pg_stat_statements"):
        ...                        # the section
    # else have() printed one line: "skipped (pg_stat_statements): <why> <how to enable it>"

and a chapter that cannot go on at all without something (its own database: CREATEDB) calls
``skip_rest_unless("createdb")`` in a cell of its own: every later cell then only prints that it was
skipped, and the notebook still passes (nbmake, ``make run``).

| capability           | what it needs                                                                  |
|----------------------|--------------------------------------------------------------------------------|
| ``pg_stat_statements`` | the view is readable in the workbook database (preloaded, extension created) |
| ``auto_explain``     | superuser, ``LOAD 'auto_explain'`` works, and the server log is readable (embedded) |
| ``superuser``        | the role is a superuser (resets, roles, ALTER SYSTEM)                          |
| ``createroles``      | superuser or CREATEROLE                                                        |
| ``createdb``         | superuser or CREATEDB (a chapter's own database: clones, test databases)       |
| ``embedded``         | the workbook's own server (not ``DATABASE_URL``): its log, its configuration   |
"""

from __future__ import annotations

import os

from sqlalchemy import Engine, text

from .config import WorkbookError

NAMES = ("pg_stat_statements", "auto_explain", "superuser", "createroles", "createdb", "embedded")

_SKIPPING: dict[str, str] = {}  # the reason the rest of this notebook is skipped, if any


def _probe(conn, sql: str) -> tuple[bool, str]:
    """Run ``sql`` in a savepoint: (True, "") or (False, the server's first line)."""
    try:
        with conn.begin_nested():
            conn.execute(text(sql))
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any refusal is a missing capability, said in one line
        orig = getattr(exc, "orig", exc)
        return False, (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def capabilities(engine: Engine | None = None) -> dict[str, str | None]:
    """Every capability of ``NAMES``: None when available, else one line saying why not and how to enable it."""
    from .database import get_engine, is_embedded, masked

    engine = engine or get_engine()
    db = engine.url.database
    where = masked(engine.url)
    out: dict[str, str | None] = {}
    with engine.connect() as conn:
        role = conn.execute(
            text("SELECT current_user, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
        ).one()
        user, superuser, createdb, createrole = role
        ok, err = _probe(conn, "SELECT 1 FROM pg_stat_statements LIMIT 1")
        if ok:
            out["pg_stat_statements"] = None
        elif "shared_preload_libraries" in err:
            out["pg_stat_statements"] = (
                f"pg_stat_statements is not loaded on {where}: set shared_preload_libraries = 'pg_stat_statements' "
                f"in postgresql.conf, restart the server, then CREATE EXTENSION pg_stat_statements in {db!r}."
            )
        else:
            out["pg_stat_statements"] = (
                f"pg_stat_statements cannot be read in {db!r} ({err}): a superuser must run "
                f"CREATE EXTENSION pg_stat_statements there (with shared_preload_libraries = 'pg_stat_statements')."
            )
        if not superuser:
            out["auto_explain"] = (
                f"auto_explain's settings need superuser, which {user!r} is not; a superuser can set "
                "auto_explain.log_min_duration for you, and the plans appear in the server's log."
            )
        elif not is_embedded():
            ok, err = _probe(conn, "LOAD 'auto_explain'")
            out["auto_explain"] = (
                f"the workbook reads auto_explain's plans from its embedded server's log only; on {where} set "
                "shared_preload_libraries = 'auto_explain' and read that server's log yourself (or unset DATABASE_URL)"
                + ("" if ok else f" ({err})")
                + "."
            )
        else:
            from . import server

            log = server.status().log
            readable = bool(log) and os.access(log, os.R_OK)
            out["auto_explain"] = None if readable else f"the embedded server's log {log} is not readable here."
        out["superuser"] = (
            None
            if superuser
            else f"{user!r} is not a superuser; this section needs one (ALTER ROLE {user} SUPERUSER, or the embedded server)."
        )
        out["createroles"] = (
            None
            if superuser or createrole
            else f"{user!r} may not create roles; ask for CREATEROLE (ALTER ROLE {user} CREATEROLE) or use the embedded server."
        )
        out["createdb"] = (
            None
            if superuser or createdb
            else f"{user!r} may not create databases, and this needs a database of its own; ask the server's "
            f"administrator for CREATEDB (ALTER ROLE {user} CREATEDB), or unset DATABASE_URL to use the embedded server."
        )
    out["embedded"] = (
        None
        if is_embedded()
        else f"this needs the workbook's embedded server, and DATABASE_URL points at {where}; unset it to use the embedded one."
    )
    return out


def missing(name: str, engine: Engine | None = None) -> str | None:
    """None when ``name`` is available, else the one-line reason (see ``capabilities``)."""
    if name not in NAMES:
        raise ValueError(f"unknown capability {name!r}; known: {', '.join(NAMES)}")
    return capabilities(engine)[name]


def have(name: str, engine: Engine | None = None) -> bool:
    """True when capability ``name`` is available; otherwise print ``skipped (name): <reason>`` and return False."""
    reason = missing(name, engine)
    if reason is not None:
        print(f"skipped ({name}): {reason}")
    return reason is None


def _skip_transformer(lines: list[str]) -> list[str]:
    if not _SKIPPING:
        return lines
    ((name, reason),) = _SKIPPING.items()
    return [f"print({f'skipped ({name}): the rest of this chapter needs it (see above)'!r})\n"]


def skip_rest_unless(name: str, engine: Engine | None = None) -> bool:
    """In a notebook: when ``name`` is missing, print the reason and make every LATER cell print that it is
    skipped instead of running (the notebook passes); True, and nothing changes, when it is available.

    Call it in a cell of its own, before the first cell that needs ``name``. Outside IPython a missing
    capability raises ``WorkbookError`` with the reason.
    """
    reason = missing(name, engine)
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:  # pragma: no cover - IPython comes with the workbook
        ip = None
    transformers = ip.input_transformers_cleanup if ip is not None else None
    if transformers is not None and _skip_transformer in transformers:
        transformers.remove(_skip_transformer)  # re-run after the capability was granted
    _SKIPPING.clear()
    if reason is None:
        return True
    if transformers is None:
        raise WorkbookError(f"{name}: {reason}")
    print(f"skipped ({name}): {reason} The rest of this chapter is skipped.")
    _SKIPPING[name] = reason
    transformers.append(_skip_transformer)
    return False
