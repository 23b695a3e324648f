"""``python -m helpers bench seed --scale S``: the seed against ``pgbench -i`` on the same server.

Both are timed as whole commands, each in a database of its own: the seed with its indexes,
foreign keys and VACUUM ANALYZE (``python -m helpers seed``), and ``pgbench -i`` with its
vacuum and primary keys, at the pgbench scale factor that loads about as many rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psycopg
from psycopg import sql

from . import server
from .database import _libpq_kwargs, database_url, drop_database, empty_database, is_embedded
from .seed import SCALES


def _fresh_db(suffix: str) -> str:
    """An empty database of the benchmark's own; returns its name."""
    engine = empty_database(suffix)
    engine.dispose()
    return engine.url.database


def expected_rows(scale: str) -> int:
    """Rows the seed loads at a scale (measured after the run; this is for sizing pgbench)."""
    s = SCALES[scale]
    return int(s.users * 3.8 + s.posts * 3 + s.comments + s.products + s.orders * 3.5 + s.tags)


def bench_seed(scale: str) -> dict:
    base = database_url()
    seed_db = _fresh_db("bench_seed")
    pgb_db = _fresh_db("bench_pgbench")
    env = {**os.environ, "WORKBOOK_DB": seed_db, "WORKBOOK_SCALE": scale}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "helpers", "seed", "--scale", scale], env=env, capture_output=True, text=True
    )
    seed_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    with psycopg.connect(**_libpq_kwargs(base.set(database=seed_db))) as conn:
        from .models import TABLES

        seed_rows = sum(
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0] for t in TABLES
        )
    pg_scale = max(1, round(seed_rows / 100_000))
    pgbench = (server.bin_dir() / "pgbench") if is_embedded() else "pgbench"
    penv = {
        **os.environ,
        "PGPASSWORD": base.password or "",
        "PGHOST": base.host or "localhost",
        "PGPORT": str(base.port or 5432),
        "PGUSER": base.username or "",
        "PGDATABASE": pgb_db,
    }
    t0 = time.perf_counter()
    res = subprocess.run([str(pgbench), "-i", "-q", "-s", str(pg_scale)], env=penv, capture_output=True, text=True)
    pgb_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    pgb_rows = 100_000 * pg_scale + 10 * pg_scale + pg_scale
    out = {
        "scale": scale,
        "seed_rows": seed_rows,
        "seed_s": seed_s,
        "seed_rows_per_s": seed_rows / seed_s,
        "pgbench_scale": pg_scale,
        "pgbench_rows": pgb_rows,
        "pgbench_s": pgb_s,
        "pgbench_rows_per_s": pgb_rows / pgb_s,
        "ratio": (seed_rows / seed_s) / (pgb_rows / pgb_s),
    }
    drop_database("bench_seed")
    drop_database("bench_pgbench")
    print(f"seed --scale {scale}: {seed_rows:>12,} rows in {seed_s:7.2f} s = {out['seed_rows_per_s']:>12,.0f} rows/s")
    print(
        f"pgbench -i -s {pg_scale:<4}: {pgb_rows:>12,} rows in {pgb_s:7.2f} s = {out['pgbench_rows_per_s']:>12,.0f} rows/s"
    )
    print(f"ratio seed / pgbench: {out['ratio']:.2f}")
    return out
