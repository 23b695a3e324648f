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
from .database import database_url, is_embedded, libpq_kwargs, libpq_tool_args
from .scratchdb import drop_database, empty_database


def _fresh_db(suffix: str) -> str:
    """An empty database of the benchmark's own; returns its name."""
    engine = empty_database(suffix)
    engine.dispose()
    return engine.url.database


def _busy_core_seconds() -> float | None:
    """CPU time all processes of this machine spent so far (Linux), to compare two whole commands."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _timed(cmd: list[str], env: dict) -> tuple[float, float | None, str]:
    """Run a whole command; returns its wall seconds, the machine's busy core-seconds, its stdout."""
    busy0, t0 = _busy_core_seconds(), time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, busy1 = time.perf_counter() - t0, _busy_core_seconds()
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {res.stderr.strip()[-800:]}")
    return wall, (busy1 - busy0) if busy0 is not None and busy1 is not None else None, res.stdout


def _rows_and_bytes(dbname: str, tables: list[str]) -> tuple[int, int]:
    with psycopg.connect(**libpq_kwargs(database_url().set(database=dbname))) as conn:
        rows = sum(
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0] for t in tables
        )
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return rows, size


def bench_seed(scale: str) -> dict:
    """Time the seed and ``pgbench -i`` as whole commands, each in a fresh database; print and return both."""
    from .models import TABLES

    base = database_url()
    seed_db = _fresh_db("bench_seed")
    pgb_db = _fresh_db("bench_pgbench")
    try:
        env = {**os.environ, "WORKBOOK_DB": seed_db, "WORKBOOK_SCALE": scale}
        seed_s, seed_cpu, seed_out = _timed([sys.executable, "-m", "helpers", "seed", "--scale", scale], env)
        seed_rows, seed_bytes = _rows_and_bytes(seed_db, list(TABLES))
        pg_scale = max(1, round(seed_rows / 100_000))  # pgbench loads 100,000 accounts per unit of scale
        # the embedded server's own pgbench; against a server of your own, the wheel's
        pgbench = (server.bin_dir() if is_embedded() else server.embedded_bin_dir()) / "pgbench"
        conninfo, penv = libpq_tool_args(base.set(database=pgb_db))
        pgb_s, pgb_cpu, _ = _timed([str(pgbench), "-i", "-q", "-s", str(pg_scale), conninfo], penv)
        pgb_rows, pgb_bytes = _rows_and_bytes(
            pgb_db, ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]
        )
    finally:
        drop_database("bench_seed")
        drop_database("bench_pgbench")
    stages = next((ln.strip() for ln in seed_out.splitlines() if "time per stage" in ln), "")
    out = {
        "scale": scale,
        "seed_rows": seed_rows,
        "seed_s": seed_s,
        "seed_bytes": seed_bytes,
        "seed_core_s": seed_cpu,
        "seed_stages": stages,
        "seed_rows_per_s": seed_rows / seed_s,
        "pgbench_scale": pg_scale,
        "pgbench_rows": pgb_rows,
        "pgbench_s": pgb_s,
        "pgbench_bytes": pgb_bytes,
        "pgbench_core_s": pgb_cpu,
        "pgbench_rows_per_s": pgb_rows / pgb_s,
        "ratio": (seed_rows / seed_s) / (pgb_rows / pgb_s),
        "bytes_ratio": (seed_bytes / seed_s) / (pgb_bytes / pgb_s),
    }

    def line(label: str, rows: int, secs: float, size: int, cpu: float | None) -> str:
        cpu_txt = f", {cpu:5.0f} core-s" if cpu is not None else ""
        return (
            f"{label:<19}: {rows:>12,} rows, {size / 1e9:5.2f} GB in {secs:7.2f} s = "
            f"{rows / secs:>10,.0f} rows/s, {size / 1e6 / secs:5.0f} MB/s{cpu_txt}"
        )

    print(line(f"seed --scale {scale}", seed_rows, seed_s, seed_bytes, seed_cpu))
    if stages:
        print(f"  seed, {stages}")
    print(line(f"pgbench -i -s {pg_scale}", pgb_rows, pgb_s, pgb_bytes, pgb_cpu))
    print(f"ratio seed / pgbench: {out['ratio']:.2f} in rows/s, {out['bytes_ratio']:.2f} in MB/s")
    print("(core-s: CPU time of the whole machine during each command, server and client included)")
    from .results import record

    print(f"written to {record(f'bench_seed_{scale}', out)}")
    return out
