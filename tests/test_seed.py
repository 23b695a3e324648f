"""The seed: byte-identical data, the schema of helpers.models, and the safety guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_helpers
from psycopg import sql
from sqlalchemy import text

from helpers import make_engine, seed
from helpers.models import TABLES, Base

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "seed_checksums_ci.json"

SCHEMA_SQL = """
SELECT 'col' AS kind, table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
       || ' ' || coalesce(column_default, '') AS what
FROM information_schema.columns WHERE table_schema = 'public' AND table_name = ANY(:tables)
UNION ALL
SELECT 'con', conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid <> 0
  AND conrelid::regclass::text = ANY(:tables)
UNION ALL
SELECT 'idx', indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(:tables)
ORDER BY 1, 2
"""


@pytest.mark.slow  # seeds three times
def test_seed_is_byte_identical_and_matches_golden(scratch_db):
    db = scratch_db("seed_det")
    eng = make_engine(database=db)
    try:
        first = seed.seed(eng, "ci", 42)
        sums1 = seed.checksum(eng)
        seed.seed(eng, "ci", 42)
        sums2 = seed.checksum(eng)
        other = seed.seed(eng, "ci", 7)
        sums3 = seed.checksum(eng)
    finally:
        eng.dispose()
    assert sums1 == sums2, "same scale and seed must give byte-identical tables"
    assert sums3 != sums1, "another seed must give other data"
    assert first["rows"] > 150_000 and other["rows"] > 150_000
    golden = json.loads(GOLDEN.read_text())
    assert sums1 == golden, "seed changed: if intended, regenerate data/seed_checksums_ci.json (see its README note)"


def test_seeded_schema_equals_models(scratch_db, engine):
    """Keys and indexes are built after the load; the result must equal metadata.create_all."""
    db = scratch_db("schema_ref")
    ref = make_engine(database=db)
    try:
        Base.metadata.create_all(ref)
        with ref.connect() as c:
            want = c.execute(text(SCHEMA_SQL), {"tables": TABLES}).all()
    finally:
        ref.dispose()
    with engine.connect() as c:
        got = c.execute(text(SCHEMA_SQL), {"tables": TABLES}).all()
    assert got == want


def test_data_is_realistic(engine):
    with engine.connect() as c:
        top_share = c.execute(
            text("""
            SELECT max(n)::float / sum(n) FROM (SELECT count(*) AS n FROM posts GROUP BY user_id) s""")
        ).scalar()
        deleted = c.execute(text("SELECT avg((deleted_at IS NOT NULL)::int) FROM posts")).scalar()
        regions_per_country = c.execute(
            text("SELECT max(k) FROM (SELECT count(DISTINCT region) k FROM users GROUP BY country) s")
        ).scalar()
        unindexed = c.execute(
            text("""
            SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = 'comments'::regclass AND a.attname = 'user_id'""")
        ).scalar()
    assert top_share > 0.01, "a few users must own many posts"
    assert 0.02 < deleted < 0.1, "some posts are soft-deleted"
    assert regions_per_country == 1, "country determines region (the correlated pair)"
    assert unindexed == 0, "comments.user_id stays unindexed for the EXPLAIN chapter"


def test_ensure_seeded_is_idempotent(engine):
    assert seed.ensure_seeded(engine, "ci") is False


@pytest.mark.embedded  # its seed/reset processes use the embedded server (run_helpers drops DATABASE_URL)
def test_guard_refuses_foreign_tables_and_keeps_them(scratch_db):
    db = scratch_db("guard")
    eng = make_engine(database=db)
    try:
        with eng.begin() as c:
            c.execute(text("CREATE TABLE customer_data (id int PRIMARY KEY, secret text)"))
            c.execute(text("INSERT INTO customer_data VALUES (1, 'precious')"))
        for args in (["seed", "--scale", "ci"], ["reset"]):
            res = run_helpers(*args, env={"WORKBOOK_DB": db})
            assert res.returncode == 2, res.stdout + res.stderr
            assert "Refusing to seed or reset" in res.stderr and "public.customer_data" in res.stderr
            assert "Traceback" not in res.stderr
        with eng.connect() as c:
            assert c.execute(text("SELECT secret FROM customer_data")).all() == [("precious",)]
            assert c.execute(text("SELECT to_regclass('users')")).scalar() is None, "nothing may be created"
        # --force seeds beside them and still never drops them
        res = run_helpers("seed", "--scale", "ci", "--force", env={"WORKBOOK_DB": db})
        assert res.returncode == 0, res.stderr
        with eng.connect() as c:
            assert c.execute(text("SELECT secret FROM customer_data")).all() == [("precious",)]
            assert c.execute(text("SELECT count(*) FROM users")).scalar() > 0
    finally:
        eng.dispose()


def test_reset_drops_only_what_the_workbook_owns(scratch_db):
    from helpers import lab_schema

    db = scratch_db("reset")
    eng = make_engine(database=db)
    try:
        seed.seed(eng, "ci")
        schema = lab_schema(eng, "scratch")
        with eng.begin() as c:
            c.execute(text(f"CREATE TABLE {schema}.demo (x int)"))
            c.execute(text("CREATE SCHEMA mine"))
            c.execute(text("CREATE TABLE mine.keep (x int)"))
        with pytest.raises(Exception, match="Refusing"):
            seed.reset(eng)  # mine.keep is not the workbook's
        seed.reset(eng, force=True)
        with eng.connect() as c:
            # a live kernel's (this process's) scratch schema is kept; reset drops those of kernels that are gone
            assert c.execute(text("SELECT to_regclass(:t)"), {"t": f"{schema}.demo"}).scalar() is not None
            assert c.execute(text("SELECT to_regclass('mine.keep')")).scalar() == "mine.keep"
            assert seed.is_seeded(eng, "ci", 42)
    finally:
        eng.dispose()


@pytest.mark.slow  # seeds twice
def test_more_lanes_give_the_same_data(scratch_db):
    """The task graph may run tables and foreign keys in any order: the data must not depend on it."""
    eng = make_engine(database=scratch_db("lanes"))
    try:
        res = seed.seed(eng, "ci", 42, lanes=5)
        sums = seed.checksum(eng)
        with eng.connect() as c:
            fks = c.execute(text("SELECT count(*) FILTER (WHERE convalidated) FROM pg_constraint WHERE contype = 'f'"))
            validated = fks.scalar()
    finally:
        eng.dispose()
    assert res["lanes"] == 5
    assert sums == json.loads(GOLDEN.read_text())
    assert validated == sum(len(t.foreign_key_constraints) for t in Base.metadata.sorted_tables)


def test_seeded_tables_are_all_visible_analysed_and_quiet(engine):
    """COPY FREEZE leaves every page all-visible (index-only scans work at once), ANALYZE has run,
    and no insert counts are left over that would bring autovacuum by in the middle of a lesson.

    "ANALYZE has run" is read from what the planner uses (``pg_statistic`` rows, ``reltuples``), which
    survives a server crash; ``pg_stat_user_tables.last_analyze`` does not (the cumulative statistics
    are discarded by crash recovery, e.g. after the machine went down with the server running)."""
    with engine.connect() as c:
        rows = c.execute(
            text("""
            SELECT c.relname, c.relpages, c.relallvisible, s.n_ins_since_vacuum, s.n_mod_since_analyze,
                   c.reltuples >= 0 AND EXISTS (SELECT 1 FROM pg_statistic st WHERE st.starelid = c.oid)
            FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
            WHERE c.relname = ANY(:tables) AND s.schemaname = 'public'"""),
            {"tables": TABLES},
        ).all()
    assert len(rows) == len(TABLES)
    for name, pages, all_visible, ins, mod, analysed in rows:
        assert all_visible == pages > 0, f"{name}: {all_visible} of {pages} pages all-visible"
        assert (ins, mod) == (0, 0), f"{name}: {ins} inserts since vacuum, {mod} changes since analyze"
        assert analysed, name


def test_a_generator_failing_midway_rolls_its_table_back(scratch_db, monkeypatch):
    """psql streams rows as they are made: a generator failing after some rows must not leave a
    short table that looks complete (binary COPY accepts a stream cut between two rows)."""
    failing = seed.Load(
        "id, name",
        "SELECT g, CASE WHEN g < 40 THEN 'tag-' || g ELSE (1 / 0)::text END FROM generate_series(1, :tags) AS g",
    )
    monkeypatch.setitem(seed.LOADS, "tags", failing)
    eng = make_engine(database=scratch_db("failing"))
    try:
        with pytest.raises(seed.WorkbookError, match="Generating table tags failed: .*division by zero"):
            seed.seed(eng, "ci", 42)
        with eng.connect() as c:
            assert c.execute(text("SELECT to_regclass('tags')")).scalar() is None
            assert seed.seeded_info(eng)["complete"] == "false"
    finally:
        eng.dispose()


@pytest.mark.slow  # the seed and pgbench -i, three runs each
def test_bench_runs_both_loaders_and_cleans_up(engine, capsys):
    from helpers.bench import bench_seed

    out = bench_seed("ci")
    printed = capsys.readouterr().out
    assert out["seed_rows"] > 150_000 and out["pgbench_rows"] == 200_022  # pgbench -i -s 2
    assert out["seed_rows_per_s"] > 0 and out["pgbench_rows_per_s"] > 0 and out["ratio"] > 0
    assert "ratio seed / pgbench" in printed and "time per stage" in printed and "bench_seed_ci.json" in printed
    # fair: three runs of each, each after a CHECKPOINT and a quiet wait, medians with their spread
    assert out["rounds"] == 3 and len(out["runs"]["seed"]) == 3 and len(out["runs"]["pgbench"]) == 3
    for what in ("seed", "pgbench"):
        low, high = out[f"{what}_s_spread"]
        assert low <= out[f"{what}_s"] <= high
        assert all(run["quiet_wait_s"] >= 1.0 for run in out["runs"][what])
    assert "median of 3" in printed
    with engine.connect() as c:
        left = c.execute(text("SELECT count(*) FROM pg_database WHERE datname LIKE '%bench%'")).scalar()
    assert left == 0


def test_same_data_whatever_the_servers_timezone(scratch_db):
    """`timestamptz + interval '730 days'` depends on the session's TimeZone (days cross DST changes):
    the generator pins UTC, so a server of your own with another default gives the same data."""
    db = scratch_db("tz")
    eng = make_engine(database=db)
    try:
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            alter = sql.SQL("ALTER DATABASE {} SET TimeZone = 'America/New_York'").format(sql.Identifier(db))
            c.connection.driver_connection.execute(alter)
        seed.seed(eng, "ci", 42)
        sums = seed.checksum(eng)
    finally:
        eng.dispose()
    assert sums == json.loads(GOLDEN.read_text())


def test_the_load_skips_the_wal(scratch_db):
    """Tables created, loaded and indexed in one transaction skip the WAL at wal_level=minimal (the
    embedded server's setting). Relations under wal_skip_threshold are logged as page images at
    commit instead of synced, so at `ci` the WAL holds the small ones but not the big ones."""
    eng = make_engine(database=scratch_db("wal"))
    try:
        with eng.connect() as c:
            if c.execute(text("SHOW wal_level")).scalar() != "minimal":
                pytest.skip("a server of your own with wal_level above minimal logs the load")
            before = c.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar()
        seed.seed(eng, "ci", 42)
        with eng.connect() as c:
            wal = c.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :b)"), {"b": before}).scalar()
            big = c.execute(
                text("""
                SELECT sum(pg_relation_size(c.oid)) FROM pg_class c
                WHERE c.relnamespace = 'public'::regnamespace
                  AND pg_relation_size(c.oid) >= pg_size_bytes(current_setting('wal_skip_threshold'))""")
            ).scalar()
    finally:
        eng.dispose()
    assert big > 20_000_000, "posts alone is over 20 MB at ci"
    assert wal < big, f"{wal:,.0f} WAL bytes, {big:,} bytes in relations over wal_skip_threshold"
