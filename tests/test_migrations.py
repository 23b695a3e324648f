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
from sqlalchemy import inspect, text

from helpers import drop_database, empty_database, models
from helpers.ddl import alembic_config

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
    command.upgrade(cfg, "0001")
    with migtest.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, email, name, region, country, attributes) "
                "SELECT g, 'u' || g || '@x', 'User ' || g, 'eu', 'de', '{}' FROM generate_series(1, 1200) g"
            )
        )
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
    from helpers import ddl

    nullable = ddl.observe_ddl(migtest, "add_nullable_column", lock_timeout="50ms")
    assert (nullable["lock"], nullable["blocks_reads"], nullable["blocks_writes"], nullable["rewrites_table"]) == (
        "AccessExclusiveLock",
        True,
        True,
        False,
    )
    bigint = ddl.observe_ddl(migtest, "alter_type_int_to_bigint", lock_timeout="50ms")
    assert bigint["rewrites_table"] and bigint["scans_table"]
    fk = ddl.observe_ddl(migtest, "validate_foreign_key", lock_timeout="50ms")
    assert (fk["lock"], fk["referenced_table_lock"], fk["blocks_writes"]) == (
        "ShareUpdateExclusiveLock",
        "RowShareLock",
        False,
    )
    cic = ddl.observe_ddl(migtest, "create_index_concurrently", lock_timeout="50ms")
    assert cic["lock"] == "ShareUpdateExclusiveLock" and not cic["blocks_writes"] and cic["index_valid"]


def test_load_reports_the_wait_behind_a_held_lock(migtest):
    from helpers import ddl

    _, child = ddl.demo_tables(migtest, "wb_migrations")
    with ddl.Load(
        migtest,
        write_sql=f"UPDATE {child} SET v = v + 1 WHERE id = %(id)s",
        read_sql=f"SELECT v FROM {child} WHERE id = %(id)s",
        ids=range(1, 101),
        rate_per_s=50,
    ) as load:
        ddl.hold_transaction(migtest, [f"LOCK TABLE {child} IN SHARE MODE"], hold_s=0.5)  # blocks writes only
    result = load.result
    assert result.errors() == 0 and len(result.ops) > 10
    assert result.longest_wait("write") > 0.3 and result.longest_wait("read") < result.longest_wait("write") * 0.5
    assert set(result.throughput(0.1)["kind"]) == {"read", "write"}
