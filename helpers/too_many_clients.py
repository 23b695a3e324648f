"""The child side of ``pooling.TooManyClients``: fill a throwaway server until PostgreSQL refuses.

    WORKBOOK_STATE=/tmp/wb-pool-XXXX python -m helpers.too_many_clients MAX_CONNECTIONS SUPERUSER_RESERVED

Runs only with ``WORKBOOK_STATE`` on a throwaway folder of the demo (named ``wb-pool-*``), so the
workbook's own server is never touched: it starts an embedded server there, sets
``max_connections`` and ``superuser_reserved_connections``, restarts it, opens connections as an
ordinary role and then as the superuser until each is refused, stops the server, removes the
folder, and prints one JSON line: the limits, the server version and what each refusal said.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys

import psycopg
from psycopg import sql

from . import server
from .config import WorkbookError

THROWAWAY_PREFIX = "wb-pool-"


def fill(su: dict) -> list[dict]:
    """Open connections as the application role, then as the superuser, until each is refused."""
    app = dict(su, user="wb_pool_app", password="app")
    held, events = [], []
    try:
        for who, kw in (("application role", app), ("superuser", su)):
            while len(held) < 50:
                try:
                    held.append(psycopg.connect(**kw, autocommit=True))
                except psycopg.OperationalError as exc:
                    message = str(exc).strip().rsplit("FATAL:", 1)[-1].strip()
                    events.append({"who": who, "opened_before_error": len(held), "message": message})
                    break
        with held[0].cursor() as cur:
            limits = {
                name: cur.execute(sql.SQL("SELECT current_setting({})").format(sql.Literal(name))).fetchone()[0]
                for name in ("max_connections", "superuser_reserved_connections", "server_version")
            }
    finally:
        for h in held:
            h.close()
    return [limits, *events]


def main(max_connections: int, superuser_reserved: int) -> dict:
    own = os.environ.get("WORKBOOK_STATE", "")
    if not os.path.basename(own).startswith(THROWAWAY_PREFIX) or server.state_root() != pathlib.Path(own):
        sys.exit("refusing to run: WORKBOOK_STATE is not a throwaway folder of this demo")
    out: dict = {}
    try:
        info = server.start()
        su = dict(
            host="127.0.0.1",
            port=info.port,
            user=server.SUPERUSER,
            password=server.password(),
            dbname="postgres",
            connect_timeout=5,
        )
        with psycopg.connect(**su, autocommit=True) as c:
            for name, value in (
                ("max_connections", max_connections),
                ("superuser_reserved_connections", superuser_reserved),
                ("shared_buffers", "16MB"),
            ):  # ALTER SYSTEM takes no parameters: the values go in as literals, quoted by psycopg
                c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(str(value))))
            c.execute("CREATE ROLE wb_pool_app LOGIN PASSWORD 'app'")
        server.stop()
        su["port"] = server.start().port  # the restart may have moved the server to another port
        limits, *events = fill(su)
        out = {
            "max_connections": int(limits["max_connections"]),
            "superuser_reserved_connections": int(limits["superuser_reserved_connections"]),
            "server_version": limits["server_version"],
            "events": events,
        }
    finally:
        try:
            server.stop()
            shutil.rmtree(own, ignore_errors=True)
        except WorkbookError as exc:
            out["stop_error"] = str(exc)
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
