"""helpers.plans on the real server: exclusive times, misestimates, parallel/CTE/InitPlan plans, rollback."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from sqlalchemy import select, text  # noqa: E402

from helpers import compare, explain, get_engine, lab_schema, models, setup  # noqa: E402
from helpers.plans import from_json, misestimate_factor  # noqa: E402

NO_PARALLEL = {"max_parallel_workers_per_gather": "0"}


@pytest.fixture(scope="module")
def engine():
    return setup(quiet=True)


@pytest.fixture()
def conn(engine):
    """A connection with a temporary table of planted data (gone when the connection closes)."""
    with engine.connect() as c:
        c.execute(
            text("""
            CREATE TEMP TABLE planted AS
            SELECT g AS id, g % 100 AS b, g % 100 AS c FROM generate_series(1, 20000) AS g""")
        )
        c.execute(text("ANALYZE planted"))
        yield c
        c.rollback()


def _sum_exclusive(plan) -> float:
    return float(plan.nodes["exclusive_ms"].sum())


# ----------------------------------------------------------------------------- pure JSON parsing
def test_misestimate_factor_sign():
    assert misestimate_factor(1000, 10) == 100  # under-estimated: more rows came than planned
    assert misestimate_factor(10, 1000) == -100  # over-estimated
    assert misestimate_factor(5, 5) == 1
    assert misestimate_factor(0, 1) == 1  # zero rows counts as one, like PEV2
    assert misestimate_factor(None, 3) is None


PG15_STYLE = [
    {
        "Plan": {
            "Node Type": "Nested Loop",
            "Join Type": "Inner",
            "Startup Cost": 10000000000.0,
            "Total Cost": 10000000123.0,
            "Plan Rows": 10,
            "Actual Total Time": 5.0,
            "Actual Rows": 1000,
            "Actual Loops": 1,
            "Shared Hit Blocks": 7,
            "Shared Read Blocks": 3,
            "Plans": [
                {
                    "Node Type": "Seq Scan",
                    "Parent Relationship": "Outer",
                    "Relation Name": "a",
                    "Alias": "a",
                    "Startup Cost": 0.0,
                    "Total Cost": 1.0,
                    "Plan Rows": 10,
                    "Actual Total Time": 1.0,
                    "Actual Rows": 10,
                    "Actual Loops": 1,
                    "Filter": "(x > 1)",
                    "Rows Removed by Filter": 5,
                },
                {
                    "Node Type": "Index Scan",
                    "Parent Relationship": "Inner",
                    "Relation Name": "b",
                    "Alias": "b",
                    "Index Name": "b_pkey",
                    "Scan Direction": "Forward",
                    "Startup Cost": 0.0,
                    "Total Cost": 2.0,
                    "Plan Rows": 1,
                    "Actual Total Time": 0.3,
                    "Actual Rows": 100,
                    "Actual Loops": 10,
                    "Index Cond": "(id = a.id)",
                },
            ],
        },
        "Planning Time": 0.1,
        "Triggers": [],
        "Execution Time": 5.1,
    }
]


def test_pg15_style_json_disable_cost_and_loops():
    p = from_json(PG15_STYLE)
    n = p.nodes.set_index("id")
    assert bool(n.loc[0, "disabled"]) and not bool(n.loc[1, "disabled"])  # 1e10 startup cost = disabled path
    assert n.loc[2, "inclusive_ms"] == pytest.approx(3.0)  # 0.3 ms x 10 loops
    assert n.loc[0, "exclusive_ms"] == pytest.approx(5.0 - 1.0 - 3.0)
    assert n.loc[2, "actual_rows_total"] == 1000 and n.loc[2, "misestimate"] == 100
    assert n.loc[1, "rows_removed_by_filter"] == 5
    assert "Index Scan using b_pkey on b" in p.text and "Execution Time: 5.100 ms" in p.text


def test_pg18_style_fractional_rows_and_disabled_flag():
    doc = [
        {
            "Plan": {
                "Node Type": "Seq Scan",
                "Relation Name": "t",
                "Alias": "t",
                "Startup Cost": 0.0,
                "Total Cost": 35.5,
                "Plan Rows": 2,
                "Actual Total Time": 0.5,
                "Actual Rows": 0.5,
                "Actual Loops": 4,
                "Disabled": True,
            },
            "Planning Time": 0.1,
            "Execution Time": 2.1,
        }
    ]
    r = from_json(doc).nodes.iloc[0]
    assert bool(r["disabled"]) and r["actual_rows_total"] == 2.0 and r["inclusive_ms"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- on the server
def test_exclusive_times_add_up_to_execution_time(engine):
    """A non-parallel query of at least 50 ms: exclusive times sum to the execution time within 10 %."""
    sql = (
        "SELECT c.user_id, count(*), sum(length(c.body)) FROM comments c JOIN posts p ON p.id = c.post_id "
        "CROSS JOIN generate_series(1, :k) AS k WHERE p.published GROUP BY c.user_id ORDER BY 2 DESC"
    )
    k, plan = 1, None
    while k <= 64:
        plan = explain(sql, {"k": k}, engine=engine, settings=NO_PARALLEL)
        if plan.execution_ms >= 50:
            break
        k *= 2
    assert plan.execution_ms >= 50
    assert not plan.nodes["parallel"].any()
    assert (plan.nodes["exclusive_ms"] >= 0).all()
    assert _sum_exclusive(plan) == pytest.approx(plan.execution_ms, rel=0.10)
    # exclusive never exceeds inclusive, and the root's inclusive time is the whole run
    assert (plan.nodes["exclusive_ms"] <= plan.nodes["inclusive_ms"] + 1e-9).all()
    assert plan.root["inclusive_ms"] == pytest.approx(plan.execution_ms, rel=0.10)


def test_planted_misestimates_have_the_right_sign(conn):
    # b and c are equal: the planner multiplies their selectivities (1/100 * 1/100) -> under-estimate
    under = explain("SELECT * FROM planted WHERE b = 1 AND c = 1", engine=conn)
    scan = under.find("Seq Scan", "planted").iloc[0]
    assert scan["actual_rows_total"] == 200 and scan["plan_rows"] <= 5
    assert scan["misestimate"] >= 40 and scan["estimate"] == "under"
    assert not under.misestimates(10).empty
    # b < 50 and c >= 50 never both hold; the planner expects a quarter of the table -> over-estimate
    over = explain("SELECT * FROM planted WHERE b < 50 AND c >= 50", engine=conn)
    scan = over.find("Seq Scan", "planted").iloc[0]
    assert scan["actual_rows_total"] == 0 and scan["misestimate"] <= -1000 and scan["estimate"] == "over"


def test_parallel_plan_parses_without_negative_exclusive_times(engine):
    force_parallel = {
        "parallel_setup_cost": "0",
        "parallel_tuple_cost": "0",
        "min_parallel_table_scan_size": "0",
        "max_parallel_workers_per_gather": "2",
    }
    plan = explain(
        "SELECT post_id, count(*) FROM comments WHERE body LIKE :p GROUP BY post_id",
        {"p": "%nice%"},
        engine=engine,
        settings=force_parallel,
    )
    assert plan.has("Gather") or plan.has("Gather Merge")
    nodes = plan.nodes
    assert nodes["parallel"].any()
    assert (nodes["exclusive_ms"] >= 0).all() and (nodes["inclusive_ms"] >= 0).all()
    # per-worker times are divided among the processes: no node under the Gather exceeds the whole run
    assert (nodes["inclusive_ms"] <= plan.execution_ms * 1.05).all()
    assert _sum_exclusive(plan) <= plan.execution_ms * 1.05


def test_cte_and_initplan_are_charged_once(engine):
    sql = """
        WITH per_user AS MATERIALIZED (SELECT user_id, count(*) AS n FROM comments GROUP BY user_id)
        SELECT a.user_id, a.n FROM per_user a JOIN per_user b ON b.user_id = a.user_id + 1
        WHERE a.n > (SELECT avg(n) FROM per_user)"""
    plan = explain(sql, engine=engine, settings=NO_PARALLEL)
    nodes = plan.nodes
    assert "CTE per_user" in set(nodes["subplan"].dropna())
    assert any(str(s).startswith("InitPlan") for s in nodes["subplan"].dropna())
    assert (nodes["exclusive_ms"] >= 0).all()
    # the CTE's time is charged to the CTE Scan that pulled it, not counted twice nor dropped
    assert _sum_exclusive(plan) == pytest.approx(plan.execution_ms, rel=0.15)
    cte = nodes[nodes["subplan"] == "CTE per_user"].iloc[0]
    scans = nodes[nodes["node_type"] == "CTE Scan"]
    assert (scans["exclusive_ms"] < cte["inclusive_ms"]).all()


def test_explaining_dml_changes_nothing(engine):
    from sqlalchemy import Column, Integer, MetaData, Table, delete, func, insert, literal, update

    schema = lab_schema(engine, "explain_test")
    t = Table("t", MetaData(schema=schema), Column("id", Integer), Column("v", Integer))
    g = func.generate_series(1, 1000).table_valued("g").render_derived()
    with engine.begin() as c:
        t.drop(c, checkfirst=True)
        t.create(c)
        c.execute(insert(t).from_select(["id", "v"], select(g.c.g, literal(1))))
    try:
        plan = explain(update(t).where(t.c.id <= 500).values(v=t.c.v + 1), engine=engine)
        assert plan.root["node_type"] == "ModifyTable" and plan.nodes.iloc[1]["actual_rows_total"] == 500
        plan = explain(delete(t), engine=engine)
        assert plan.nodes.iloc[1]["actual_rows_total"] == 1000
        with engine.connect() as c:
            assert c.execute(select(func.count(), func.sum(t.c.v))).one() == (1000, 1000)
    finally:
        with engine.begin() as c:
            t.drop(c, checkfirst=True)


def test_explain_on_a_connection_rolls_back_to_a_savepoint(conn):
    explain("DELETE FROM planted WHERE b = 1", engine=conn)
    assert conn.execute(text("SELECT count(*) FROM planted")).scalar() == 20000  # the temp table saw no delete


def test_orm_statement_with_bound_and_expanding_parameters(engine):
    stmt = select(models.User.id).where(models.User.id.in_([3, 5, 8]), models.User.email.like("user%"))
    plan = explain(stmt, engine=engine)
    assert "IN (3, 5, 8)" in plan.sql and "'user%'" in plan.sql
    assert plan.root["actual_rows_total"] == 3
    assert plan.find(relation="users")["index"].iloc[0] == "users_pkey"


def test_plain_explain_without_analyze(engine):
    plan = explain("SELECT * FROM comments WHERE user_id = :u", {"u": 7}, analyze=False, buffers=False, engine=engine)
    assert not plan.analyzed and plan.execution_ms is None
    assert plan.node_types == ["Seq Scan"]  # comments.user_id is unindexed on purpose
    assert plan.nodes["exclusive_ms"].isna().all()
    assert plan.summary()["shared_hit"] == 0 and plan.shared_blocks == 0  # no BUFFERS asked for
    assert "Seq Scan on comments" in plan.text and "Execution Time" not in plan.text


def test_repeat_and_compare(engine):
    before = explain(
        "SELECT count(*) FROM comments WHERE user_id = :u", {"u": 7}, engine=engine, settings=NO_PARALLEL, repeat=3
    )
    after = explain(
        "SELECT count(*) FROM comments WHERE post_id = :p", {"p": 7}, engine=engine, settings=NO_PARALLEL, repeat=3
    )
    assert len(before.runs_ms) == 3 and before.median_ms > 0
    cmp = compare(before, after)
    assert cmp.speedup == pytest.approx(before.median_ms / after.median_ms)
    assert cmp.speedup > 2  # index on post_id vs a full scan
    assert list(cmp.df["plan"]) == ["before", "after"]
    html = cmp._repr_html_()
    assert "speed-up" in html and "Seq Scan on comments" in html
    fig = cmp.figure("t")
    try:
        assert len(fig.axes) == 4
        labels = {t.get_text() for ax in fig.axes for t in ax.texts}
        assert "Seq Scan on comments" in labels
    finally:
        plt.close(fig)


def test_display_flags_misestimates(conn):
    plan = explain("SELECT * FROM planted WHERE b = 1 AND c = 1", engine=conn)
    assert "under" in plan._repr_html_()
    fig = plan.figure()
    try:
        assert any("under" in t.get_text() for ax in fig.axes for t in ax.texts)
    finally:
        plt.close(fig)


def test_engine_default_is_the_shared_engine(engine):
    assert get_engine() is not None
    assert explain("SELECT 1").root["node_type"] == "Result"


def test_percent_signs_and_text_parameters(engine):
    """A literal % reaches the server as %, with and without bound parameters, and reads back with values in."""
    bare = explain("SELECT count(*) FROM comments WHERE body LIKE '%nice post%'", engine=engine, settings=NO_PARALLEL)
    bound = explain(
        "SELECT count(*) FROM comments WHERE body LIKE '%nice post%' AND id > :x",
        {"x": 10},
        engine=engine,
        settings=NO_PARALLEL,
    )
    assert bare.find("Seq Scan").iloc[0]["actual_rows_total"] == 60000 * _ci_fraction(engine)
    assert (
        bound.find("Seq Scan").iloc[0]["actual_rows_total"] == bare.find("Seq Scan").iloc[0]["actual_rows_total"] - 10
    )
    assert "'%nice post%'" in bare.sql and "'%nice post%'" in bound.sql and "id > 10" in bound.sql


def _ci_fraction(engine) -> float:
    """Rows of comments relative to the ci scale (every comment body contains 'nice post')."""
    with engine.connect() as c:
        return c.execute(text("SELECT count(*) FROM comments")).scalar() / 60000


# ----------------------------------------------------------------------------- the text, against the server's own
TEXT_CASES = {  # name -> (SQL on the planted temp table, planner settings)
    "seq scan, filter, rows removed": ("SELECT * FROM planted WHERE b = 7", {}),
    "sort method, top-N": ("SELECT * FROM planted ORDER BY c DESC, id LIMIT 5", {}),
    "sort method, quicksort": ("SELECT b, id FROM planted WHERE id < 3000 ORDER BY b, id", {}),
    "hash aggregate, batches": ("SELECT b, count(*) FROM planted GROUP BY b", {"enable_sort": "off"}),
    "hash join, buckets": (
        "SELECT count(*) FROM planted p JOIN planted q ON q.id = p.id WHERE p.b = 3",
        {"enable_nestloop": "off", "enable_mergejoin": "off"},
    ),
    "index scan, loops": (
        "SELECT count(*) FROM planted p JOIN planted q ON q.id = p.id WHERE p.b = 3 AND p.id < 2000",
        {"enable_hashjoin": "off", "enable_mergejoin": "off", "enable_memoize": "off"},
    ),
    "bitmap heap scan, heap blocks": ("SELECT count(*) FROM planted WHERE b = 5", {"enable_seqscan": "off"}),
    "index only scan, heap fetches": (
        "SELECT count(*) FROM planted WHERE id BETWEEN 100 AND 900",
        {"enable_seqscan": "off", "enable_bitmapscan": "off"},
    ),
    "skip scan (Index Searches on 18)": ("SELECT id FROM planted WHERE c = 4 AND id < 300", {"enable_seqscan": "off"}),
    "initplan and never executed": (
        "SELECT * FROM planted WHERE id = (SELECT max(id) FROM planted WHERE b = 1000) ORDER BY id",
        {},
    ),
    "merge join, backward": (
        "SELECT p.id FROM planted p JOIN planted q ON q.id = p.id ORDER BY p.id DESC LIMIT 3",
        {"enable_hashjoin": "off", "enable_nestloop": "off"},
    ),
}


def _masked(lines: list[str]) -> list[str]:
    """Lines with what differs between two executions masked: times, and buffer counts (hit vs read)."""
    import re

    out, skip = [], False
    for line in lines:
        if line == "Planning:":  # planning buffers: the catalog cache decides, run to run
            skip = True
            continue
        if skip and line.startswith("  ") and "Buffers:" in line:
            continue
        skip = False
        line = re.sub(r"(Planning|Execution) Time: [\d.]+ ms", r"\1 Time: <ms>", line)
        line = re.sub(r"Buffers: .*", "Buffers: <blocks>", line)
        out.append(line)
    return out


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_is_the_servers_own_line_by_line(conn, case):
    sql, gucs = TEXT_CASES[case]
    conn.execute(text("CREATE INDEX IF NOT EXISTS planted_id ON planted (id)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS planted_b ON planted (b)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS planted_c_id ON planted (c, id)"))
    conn.execute(text("ANALYZE planted"))
    settings = {"max_parallel_workers_per_gather": "0", **gucs}
    ours = explain(sql, engine=conn, settings=settings, timing=False)
    with conn.begin_nested() as sp:
        for k, v in settings.items():
            conn.execute(text("SELECT set_config(:k, :v, true)"), {"k": k, "v": v})
        server = [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT TEXT) " + sql)]
        sp.rollback()
    assert _masked(ours.text.splitlines()) == _masked(server), "\n".join(server)


def test_text_shows_index_searches_exactly_where_the_server_does(conn):
    """PostgreSQL 18 prints Index Searches under every index scan; 15 to 17 never do."""
    conn.execute(text("CREATE INDEX IF NOT EXISTS planted_c_id ON planted (c, id)"))
    conn.execute(text("ANALYZE planted"))
    version = conn.execute(text("SHOW server_version_num")).scalar()
    plan = explain("SELECT id FROM planted WHERE c = 4 AND id < 300", engine=conn, settings={"enable_seqscan": "off"})
    if int(version) >= 180000:
        assert "Index Searches: 1" in plan.text
        assert plan.nodes["index_searches"].dropna().tolist() == [1]
    else:
        assert "Index Searches" not in plan.text and plan.nodes["index_searches"].isna().all()
