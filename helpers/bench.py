"""``python -m helpers bench seed --scale S``: the seed against ``pgbench -i`` on the same server, fairly.

Both are timed as whole commands, each in a database of its own: the seed with its indexes,
foreign keys and VACUUM ANALYZE (``python -m helpers seed``), and ``pgbench -i`` with its
vacuum and primary keys, at the pgbench scale factor that loads about as many rows. Each runs after
a CHECKPOINT and a quiet wait (the previous command's write-back done), in alternating order, three
times: the medians, with their spread, are compared.
"""

from __future__ import annotations

import os
import statistics
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


_QUIET_BYTES = 64 << 20  # "quiet": the kernel's dirty and in-flight pages below this
_QUIET_WAIT_S = 300  # at most this long (the seed at `large` leaves 4.7 GB to write back)


def _dirty_bytes() -> int | None:
    """Page-cache bytes still to be written to disk (Dirty + Writeback in /proc/meminfo), None off Linux."""
    try:
        with open("/proc/meminfo") as fh:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(("Dirty:", "Writeback:"))}
    except (OSError, ValueError, IndexError):
        return None
    return (kb.get("Dirty", 0) + kb.get("Writeback", 0)) * 1024


def _quiet(dbname: str) -> float:
    """Before a timed command: CHECKPOINT (the server's dirty buffers go to the kernel), sync, and wait until
    the kernel has written them back, so a command never pays for the previous one's write-back. Seconds waited."""
    t0 = time.perf_counter()
    with psycopg.connect(**libpq_kwargs(database_url().set(database=dbname)), autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass  # a server of one's own without pg_checkpoint: the sync below still drains the kernel's side
    os.sync()
    deadline = time.monotonic() + _QUIET_WAIT_S
    while (dirty := _dirty_bytes()) is not None and dirty > _QUIET_BYTES and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # and one more second of nothing
    return time.perf_counter() - t0


def _seed_once(scale: str) -> dict:
    from .models import TABLES

    dbname = _fresh_db("bench_seed")
    try:
        waited = _quiet(dbname)
        env = {**os.environ, "WORKBOOK_DB": dbname, "WORKBOOK_SCALE": scale}
        secs, cpu, out = _timed([sys.executable, "-m", "helpers", "seed", "--scale", scale], env)
        rows, size = _rows_and_bytes(dbname, list(TABLES))
    finally:
        drop_database("bench_seed")
    stages = next((ln.strip() for ln in out.splitlines() if "time per stage" in ln), "")
    return {"s": secs, "core_s": cpu, "rows": rows, "bytes": size, "quiet_wait_s": waited, "stages": stages}


def _pgbench_once(pg_scale: int) -> dict:
    dbname = _fresh_db("bench_pgbench")
    try:
        waited = _quiet(dbname)
        # the embedded server's own pgbench; against a server of your own, the wheel's
        pgbench = (server.bin_dir() if is_embedded() else server.embedded_bin_dir()) / "pgbench"
        conninfo, penv = libpq_tool_args(database_url().set(database=dbname))
        secs, cpu, _ = _timed([str(pgbench), "-i", "-q", "-s", str(pg_scale), conninfo], penv)
        rows, size = _rows_and_bytes(
            dbname, ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]
        )
    finally:
        drop_database("bench_pgbench")
    return {"s": secs, "core_s": cpu, "rows": rows, "bytes": size, "quiet_wait_s": waited}


def _summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs if r[key] is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_seed(scale: str, rounds: int = 3) -> dict:
    """Time the seed and ``pgbench -i`` fairly: each as a whole command in a fresh database, after a
    CHECKPOINT and a quiet wait (nothing left to write back), in alternating order, ``rounds`` times each.

    Prints and records the medians with their spread (min to max), and the ratios of the medians.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    # round 1: seed then pgbench (the seed's row count sets pgbench's scale: 100,000 accounts per unit);
    # then the order alternates (S P | P S | S P ...), so neither always runs first on a cooler machine
    seeds = [_seed_once(scale)]
    pg_scale = max(1, round(seeds[0]["rows"] / 100_000))
    pgbs = [_pgbench_once(pg_scale)]
    for i in range(1, rounds):
        if i % 2:
            pgbs.append(_pgbench_once(pg_scale))
            seeds.append(_seed_once(scale))
        else:
            seeds.append(_seed_once(scale))
            pgbs.append(_pgbench_once(pg_scale))
    seed_s, pgb_s = _summary(seeds, "s"), _summary(pgbs, "s")
    seed_rows, seed_bytes = seeds[0]["rows"], statistics.median(r["bytes"] for r in seeds)
    pgb_rows, pgb_bytes = pgbs[0]["rows"], statistics.median(r["bytes"] for r in pgbs)
    out = {
        "scale": scale,
        "rounds": rounds,
        "order": "alternating, each command after a CHECKPOINT and a quiet wait",
        "seed_rows": seed_rows,
        "seed_s": seed_s["median"],
        "seed_s_spread": [seed_s["min"], seed_s["max"]],
        "seed_bytes": seed_bytes,
        "seed_core_s": _summary(seeds, "core_s")["median"],
        "seed_stages": seeds[-1]["stages"],
        "seed_rows_per_s": seed_rows / seed_s["median"],
        "pgbench_scale": pg_scale,
        "pgbench_rows": pgb_rows,
        "pgbench_s": pgb_s["median"],
        "pgbench_s_spread": [pgb_s["min"], pgb_s["max"]],
        "pgbench_bytes": pgb_bytes,
        "pgbench_core_s": _summary(pgbs, "core_s")["median"],
        "pgbench_rows_per_s": pgb_rows / pgb_s["median"],
        "ratio": (seed_rows / seed_s["median"]) / (pgb_rows / pgb_s["median"]),
        "bytes_ratio": (seed_bytes / seed_s["median"]) / (pgb_bytes / pgb_s["median"]),
        "runs": {"seed": seeds, "pgbench": pgbs},
        "quiet_wait_s": sum(r["quiet_wait_s"] for r in seeds + pgbs),
    }

    def line(label: str, rows: int, secs: dict, size: float, cpu: float | None) -> str:
        cpu_txt = f", {cpu:5.0f} core-s" if cpu is not None else ""
        med = secs["median"]
        return (
            f"{label:<19}: {rows:>12,} rows, {size / 1e9:5.2f} GB in {med:7.2f} s "
            f"(median of {rounds}, {secs['min']:.2f} to {secs['max']:.2f}) = "
            f"{rows / med:>10,.0f} rows/s, {size / 1e6 / med:5.0f} MB/s{cpu_txt}"
        )

    print(line(f"seed --scale {scale}", seed_rows, seed_s, seed_bytes, out["seed_core_s"]))
    if out["seed_stages"]:
        print(f"  seed, {out['seed_stages']}")
    print(line(f"pgbench -i -s {pg_scale}", pgb_rows, pgb_s, pgb_bytes, out["pgbench_core_s"]))
    print(f"ratio seed / pgbench: {out['ratio']:.2f} in rows/s, {out['bytes_ratio']:.2f} in MB/s (of the medians)")
    print(
        f"(each command in a fresh database after a CHECKPOINT and a quiet wait, {out['quiet_wait_s']:.0f} s in all, "
        "in alternating order; core-s: CPU time of the whole machine during each command, server and client included)"
    )
    from .results import record

    print(f"written to {record(f'bench_seed_{scale}', out)}")
    return out
