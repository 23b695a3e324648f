"""The migration tests a team should have, run on an EMPTY database of their own (<db>_migtest).

- upgrade head -> downgrade base -> upgrade head: every revision is reversible;
- the models and revision 1 agree: autogenerate finds no difference;
- data survives the expand/contract rename in both directions.
"""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import inspect, text

from helpers import alembic_config, drop_database, empty_database, loadgen, lockwatch, models

SUFFIX = "migtest"


@pytest.fixture(scope="module")
def migtest():
    engine = empty_database(SUFFIX)
    yield engine
    engine.dispose()
    drop_database(SUFFIX)


def current_revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def user_tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _users_at_0001(cfg, engine, n: int = 1200) -> None:
    """Upgrade to 0001 and give it ``n`` users (ids 1..n, ``name`` set): enough rows for the backfills' batches."""
    command.upgrade(cfg, "0001")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, email, name, region, country, attributes) "
                "SELECT g, 'u' || g || '@x', 'User ' || g, 'eu', 'de', '{}' FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )


def test_round_trip_upgrade_downgrade_upgrade(migtest):
    cfg = alembic_config(migtest)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    revisions = list(ScriptDirectory.from_config(cfg).walk_revisions())
    assert len(revisions) >= 9 and head == "0009"

    command.upgrade(cfg, "head")
    assert current_revision(migtest) == head
    assert set(models.TABLES) <= user_tables(migtest)
    columns = {c["name"] for c in inspect(migtest).get_columns("users")}
    assert "full_name" in columns and "name" not in columns  # contract ran

    command.downgrade(cfg, "base")
    assert current_revision(migtest) is None
    assert user_tables(migtest) == {"alembic_version"}

    command.upgrade(cfg, "head")
    assert current_revision(migtest) == head
    idx = {i["name"]: i for i in inspect(migtest).get_indexes("comments")}
    assert idx["ix_comments_user_id"]["column_names"] == ["user_id"]
    score = next(c for c in inspect(migtest).get_columns("comments") if c["name"] == "score")
    assert score["nullable"] is False
    command.downgrade(cfg, "base")


def test_stairway_every_revision_up_down_up(migtest):
    """The stairway: each revision upgraded, downgraded and upgraded again, one step at a time, so a
    downgrade that leaves something behind (or removes too much) fails at its own revision, not at the end."""
    cfg = alembic_config(migtest)
    command.downgrade(cfg, "base")
    script = ScriptDirectory.from_config(cfg)
    chain = [r.revision for r in reversed(list(script.walk_revisions()))]  # 0001 ... head
    climbed = []
    for i, rev in enumerate(chain):
        below = chain[i - 1] if i else None
        command.upgrade(cfg, rev)
        after_up = user_tables(migtest), {c["name"] for c in inspect(migtest).get_columns("users")}
        command.downgrade(cfg, below or "base")
        assert current_revision(migtest) == below, f"{rev}: downgrade did not return to {below}"
        command.upgrade(cfg, rev)
        assert current_revision(migtest) == rev
        again = user_tables(migtest), {c["name"] for c in inspect(migtest).get_columns("users")}
        assert again == after_up, f"{rev}: up, down, up does not give the same schema"
        climbed.append(rev)
    assert climbed == chain and climbed[-1] == script.get_current_head()
    command.downgrade(cfg, "base")


def test_revision_1_matches_the_models(migtest):
    cfg = alembic_config(migtest)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0001")
    with migtest.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, models.Base.metadata)
    assert diff == []
    # and the check can fail: one revision further, comments.score is not in the models
    command.upgrade(cfg, "0002")
    with migtest.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), models.Base.metadata)
    assert [d[0] for d in diff] == ["remove_column"] and diff[0][2] == "comments" and diff[0][3].name == "score"
    command.downgrade(cfg, "base")


def test_expand_contract_keeps_the_data_both_ways(migtest):
    cfg = alembic_config(migtest)
    command.downgrade(cfg, "base")
    _users_at_0001(cfg, migtest)
    command.upgrade(cfg, "0008")  # expand: both columns, the trigger keeps them equal
    with migtest.begin() as conn:
        conn.execute(text("UPDATE users SET name = 'old code' WHERE id = 1"))
        conn.execute(text("UPDATE users SET full_name = 'new code' WHERE id = 2"))
        conn.execute(
            text(
                "INSERT INTO users (id, email, full_name, region, country, attributes) "
                "VALUES (5000, 'n@x', 'inserted by new code', 'eu', 'de', '{}')"
            )
        )
        mismatched = conn.execute(text("SELECT count(*) FROM users WHERE name IS DISTINCT FROM full_name")).scalar()
    assert mismatched == 0
    command.upgrade(cfg, "head")  # contract
    command.downgrade(cfg, "0007")  # and all the way back
    with migtest.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, name FROM users WHERE id IN (1, 2, 3, 5000)")).all())
    assert rows == {1: "old code", 2: "new code", 3: "User 3", 5000: "inserted by new code"}
    command.downgrade(cfg, "base")


def test_observatory_reads_locks_blocking_and_rewrites_from_the_server(migtest):
    nullable = lockwatch.observe_ddl(migtest, "add_nullable_column", lock_timeout="50ms")
    assert (nullable["lock"], nullable["blocks_reads"], nullable["blocks_writes"], nullable["rewrites_table"]) == (
        "AccessExclusiveLock",
        True,
        True,
        False,
    )
    bigint = lockwatch.observe_ddl(migtest, "alter_type_int_to_bigint", lock_timeout="50ms")
    assert bigint["rewrites_table"] and bigint["scans_table"]
    fk = lockwatch.observe_ddl(migtest, "validate_foreign_key", lock_timeout="50ms")
    assert (fk["lock"], fk["referenced_table_lock"], fk["blocks_writes"]) == (
        "ShareUpdateExclusiveLock",
        "RowShareLock",
        False,
    )
    cic = lockwatch.observe_ddl(migtest, "create_index_concurrently", lock_timeout="50ms")
    assert cic["lock"] == "ShareUpdateExclusiveLock" and not cic["blocks_writes"] and cic["index_valid"]


def test_load_reports_the_wait_behind_a_held_lock(migtest):
    lockwatch.demo_tables(migtest, "wb_migrations")
    child = sql.Identifier("wb_migrations", "child")
    with loadgen.Load(
        migtest,
        write_sql=sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %(id)s").format(child),
        read_sql=sql.SQL("SELECT v FROM {} WHERE id = %(id)s").format(child),
        ids=range(1, 101),
        rate_per_s=50,
    ) as load:
        loadgen.hold_transaction(
            migtest, [sql.SQL("LOCK TABLE {} IN SHARE MODE").format(child)], hold_s=0.5
        )  # blocks writes only
    result = load.result
    assert result.errors() == 0 and len(result.ops) > 10
    assert result.longest_wait("write") > 0.3 and result.longest_wait("read") < result.longest_wait("write") * 0.5
    assert set(result.throughput(0.1)["kind"]) == {"read", "write"}


def test_the_lock_policy_retries_a_revision_whose_lock_is_held_for_a_moment(migtest, caplog):
    """env.py: 100 ms lock_timeout and a retry; a lock held 0.6 s makes attempts fail, then one succeeds."""
    import threading
    import time

    import psycopg

    cfg = alembic_config(migtest)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0006")
    held = threading.Event()

    def hold():
        with psycopg.connect(**lockwatch.app_conninfo(migtest, "wb_migrations_holder")) as conn:
            conn.execute("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE")
            held.set()
            time.sleep(0.6)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    t0 = time.perf_counter()
    caplog.set_level("WARNING", logger="alembic.env")
    command.upgrade(cfg, "0007")  # VALIDATE waits for posts: gives up after 100 ms, again and again, then gets it
    took = time.perf_counter() - t0
    holder.join()
    assert current_revision(migtest) == "0007"
    assert took > 0.3  # it did wait for the holder (and did not fail at the first lock timeout)
    retries = [r for r in caplog.records if r.name == "alembic.env" and "lock timeout (attempt" in r.getMessage()]
    assert 1 <= len(retries) < 5  # gave up after 100 ms at least once, then got the lock
    command.downgrade(cfg, "base")


#: squawk rules about style or robustness, not about locks; the test asserts the others exactly
STYLE_RULES = {"prefer-robust-stmts", "prefer-bigint-over-int", "prefer-text-field", "prefer-identity"}


def test_squawk_on_the_sql_the_revisions_really_send(migtest):
    """squawk (squawk-cli) on each revision's captured SQL: its lock rules fire only where the chapter says why."""
    from helpers import migrate

    cfg = alembic_config(migtest)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0001")
    with migtest.begin() as conn:  # a few rows, so the backfills (0003, 0008) send their batches
        conn.execute(
            text(
                "INSERT INTO users (id, email, name, region, country, attributes) "
                "SELECT g, 'u' || g || '@x', 'User ' || g, 'eu', 'de', '{}' FROM generate_series(1, 30) g"
            )
        )
        conn.execute(text("INSERT INTO posts (id, user_id, title, body, published) VALUES (1, 1, 't', 'b', true)"))
        conn.execute(
            text("INSERT INTO comments (post_id, user_id, body) SELECT 1, g, 'c' || g FROM generate_series(1, 30) g")
        )
    scripts = migrate.revision_sql(migtest, ["0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009"])
    assert "UPDATE comments SET score" in scripts["0003"] and "UPDATE users SET full_name" in scripts["0008"]
    assert all(s.startswith("SET lock_timeout = '100ms';") for s in scripts.values())  # env.py's policy, first
    verdicts = {rev: migrate.squawk(sql) for rev, sql in scripts.items()}
    lock_rules = {rev: set(df["rule"]) - STYLE_RULES for rev, df in verdicts.items()}
    expected = {rev: {"require-statement-timeout"} for rev in scripts}
    expected["0003"] = set()  # the backfill's batches: short UPDATEs, nothing to say
    expected["0009"] |= {"ban-drop-column", "ban-drop-function", "ban-drop-constraint"}  # the contract, on purpose
    if lockwatch.server_version_num(migtest) < 180000:  # before 18, 0004 drops its helper CHECK once SET NOT NULL ran
        expected["0004"] |= {"ban-drop-constraint"}
    # no require-lock-timeout (the policy), no adding-not-nullable-field (0004 and 0009 prove NOT NULL with a
    # valid constraint first), no require-concurrent-index-creation (0005), no constraint-missing-not-valid (0006)
    assert lock_rules == expected, lock_rules
    # and squawk can fail: the scanning SET NOT NULL that 0009 avoids, alone, is flagged
    unsafe = migrate.squawk("SET lock_timeout = '100ms';\nALTER TABLE users ALTER COLUMN full_name SET NOT NULL;\n")
    assert "adding-not-nullable-field" in set(unsafe["rule"])
    command.downgrade(cfg, "base")


def test_the_0008_backfill_resumes_after_a_failure_mid_way_and_keeps_what_committed(migtest):
    """A batch that fails (here a trigger raising on one row: a crash, a kill, a deploy cut short) leaves
    the batches before it committed and the revision unstamped; the next ``upgrade`` goes on from there
    and never rewrites a row already filled (same row versions before and after)."""
    cfg = alembic_config(migtest)
    cfg.attributes["batch_size"] = 200
    command.downgrade(cfg, "base")
    _users_at_0001(cfg, migtest)
    with migtest.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION fail_on_900() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.id = 900 AND NEW.full_name IS NOT NULL THEN RAISE EXCEPTION 'a failure mid-backfill'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        conn.execute(
            text("CREATE TRIGGER fail_on_900 BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION fail_on_900()")
        )
    command.upgrade(cfg, "0007")
    with pytest.raises(Exception, match="a failure mid-backfill"):
        command.upgrade(cfg, "0008")
    assert current_revision(migtest) == "0007", "a revision that failed is not stamped"
    filled = "SELECT min(id), max(id), count(*) FROM users WHERE full_name IS NOT NULL"
    versions = "SELECT id, xmin::text FROM users WHERE full_name IS NOT NULL ORDER BY id"
    with migtest.connect() as conn:
        assert tuple(conn.execute(text(filled)).one()) == (1, 800, 800)  # batches [1, 201) .. [601, 801) committed
        before = conn.execute(text(versions)).all()
    with migtest.begin() as conn:
        conn.execute(text("DROP TRIGGER fail_on_900 ON users"))
        conn.execute(text("DROP FUNCTION fail_on_900()"))
    command.upgrade(cfg, "0008")  # the same revision again: it goes on from the first NULL
    assert current_revision(migtest) == "0008"
    with migtest.connect() as conn:
        assert tuple(conn.execute(text(filled)).one()) == (1, 1200, 1200)
        after = conn.execute(text(versions)).all()
    assert after[:800] == before, "the resumed backfill rewrote rows the first run had filled"
    command.downgrade(cfg, "base")
