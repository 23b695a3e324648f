"""Pure code, no database server: measuring, statement shapes, results, plots, the schema picture, settings.

The whole file is in the unit lane (``make test-unit``), which runs with ``DATABASE_URL`` on a closed
port: a test here that reached for the server would fail, not start one.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------- timing.measure
def test_measure_orders_cases_by_their_cost_and_reports_the_spread():
    from helpers import measure

    df = measure({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, repeat=5, n=3)
    assert list(df.columns) == ["case", "median_s", "min_s", "max_s", "iqr_s", "repeats", "n"]
    fast, slow = (df.set_index("case").loc[c] for c in ("fast", "slow"))
    assert slow.median_s > 100 * fast.median_s, "a 10 ms sleep against a no-op: far apart"
    assert slow.min_s >= 0.01 and slow.min_s <= slow.median_s <= slow.max_s
    assert (df.repeats == 5).all() and (df.n == 3).all()


def test_measure_runs_setup_untimed_before_every_repetition_and_adapts_repeats():
    from helpers import measure

    calls = []
    df = measure(lambda: calls.append("run"), setup=lambda: calls.append("setup"), warmup=1, repeat=3)
    assert calls == ["setup", "run"] * 4, "one warm-up, then three timed runs, each after its setup"
    assert df.loc[0, "case"] == "<lambda>"
    adaptive = measure({"slow": lambda: time.sleep(0.03)}, min_repeat=3, max_repeat=50, budget_s=0.01)
    assert adaptive.loc[0, "repeats"] == 3, "a case slower than the budget stops at min_repeat"


# ----------------------------------------------------------------------------- counting.statement_shape
@pytest.mark.parametrize(
    "sql, shape",
    [
        ("SELECT * FROM users WHERE id = 42", "SELECT * FROM users WHERE id = ?"),
        ("SELECT * FROM users WHERE email = 'a''b@x'", "SELECT * FROM users WHERE email = ?"),
        (
            "SELECT * FROM posts WHERE user_id IN (%(p1)s, %(p2)s, %(p3)s)",
            "SELECT * FROM posts WHERE user_id IN (?, ...)",
        ),
        ("SELECT * FROM posts WHERE user_id in ($1, $2)", "SELECT * FROM posts WHERE user_id in (?, ...)"),
        ("SELECT f(%s, %s) FROM t", "SELECT f(?, ?) FROM t"),
        ("INSERT INTO t (a, b) VALUES (%s, %s), (%s, %s), (%s, %s)", "INSERT INTO t (a, b) VALUES (?, ?), ..."),
        ("SELECT x::int\n  FROM t   WHERE y = :y", "SELECT x::int FROM t WHERE y = ?"),
        ("SELECT col2 FROM t2", "SELECT col2 FROM t2"),
    ],
)
def test_statement_shape_folds_values_lists_and_literals(sql, shape):
    from helpers.counting import statement_shape

    assert statement_shape(sql) == shape


def test_too_many_queries_is_an_assertion_error():
    from helpers import TooManyQueries

    assert issubclass(TooManyQueries, AssertionError)


# ----------------------------------------------------------------------------- results: record, ordering
def test_record_writes_data_meta_and_conclusions_and_refuses_a_bad_topic(tmp_path, monkeypatch):
    from helpers import WorkbookError, ordering, record

    monkeypatch.setenv("WORKBOOK_OUTPUT", str(tmp_path))
    path = record("unit_probe", {"rows": 3, "frame": pd.DataFrame({"a": [1, 2]})}, conclusions={"x": True})
    assert path == tmp_path / "results" / "unit_probe.json"
    saved = json.loads(path.read_text())
    assert saved["rows"] == 3 and saved["conclusions"] == {"x": True}
    assert {"scale", "server_version", "cores", "commit", "recorded_at", "machine"} <= set(saved["meta"])
    assert ordering({"b": 2.0, "a": 1.0, "c": 3.0}) == ["a", "b", "c"]
    with pytest.raises((WorkbookError, ValueError)):
        record("../escape", {})


# ----------------------------------------------------------------------------- plots and the schema picture
def test_every_plot_kind_saves_a_png_into_the_output_folder(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from helpers import plots

    monkeypatch.setenv("WORKBOOK_OUTPUT", str(tmp_path))
    df = pd.DataFrame({"n": [1, 2, 1, 2], "s": [1.0, 2.0, 1.5, 3.0], "lo": [0.9] * 4, "hi": [3.5] * 4})
    df["how"] = ["a", "a", "b", "b"]
    figs = {
        "lines": plots.lines(df, "n", "s", "how", title="t", xlabel="n", ylabel="s", errors=("lo", "hi"), logy=True),
        "bars": plots.bars(["one", "two"], [1, 2], title="t", xlabel="x", ylabel="y"),
        "heat": plots.heatmap(pd.DataFrame([[True, False]], columns=["p", "q"]), title="t", xlabel="x", ylabel="y"),
    }
    for name, fig in figs.items():
        png = plots.save(fig, f"unit_{name}")
        assert png.startswith(str(tmp_path)) and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    legend = [t.get_text() for t in figs["lines"].axes[0].get_legend().get_texts()]
    assert legend == ["a", "b"]
    assert [t.get_text() for t in figs["bars"].axes[0].texts] == ["1", "2"], "each bar carries its value"


def test_the_schema_picture_draws_every_table_of_the_models():
    import matplotlib

    matplotlib.use("Agg")
    from helpers import er_diagram, models

    fig = er_diagram(models.Base.metadata)
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    for name in models.TABLES:
        assert name in text, f"{name} is not drawn"


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "env, prop, message",
    [
        ({"WORKBOOK_SCALE": "bogus"}, "scale", "not a scale"),
        ({"WORKBOOK_SEED": "x"}, "seed", "not an integer"),
        ({"WORKBOOK_DB": " "}, "db_name", "empty"),
        ({"WORKBOOK_DB": "x" * 64}, "db_name", "63"),
        ({"WORKBOOK_PORT": "80"}, "port", "not a port"),
        ({"WORKBOOK_STATE": "relative/state"}, "state_root", "relative path"),
    ],
)
def test_a_bad_setting_is_refused_with_what_to_set_instead(env, prop, message):
    from helpers import WorkbookError
    from helpers.config import Settings

    with pytest.raises(WorkbookError, match=message):
        getattr(Settings(env), prop)


def test_settings_defaults_and_one_definition_of_the_scales():
    from helpers import SCALES
    from helpers.config import Settings

    s = Settings({})
    assert (s.scale, s.seed, s.db_name, s.port) == ("ci", 42, "workbook", None)
    assert list(SCALES) == ["ci", "small", "large"]
    assert SCALES["ci"].users < SCALES["small"].users < SCALES["large"].users
    assert Settings({"WORKBOOK_SCALE": "small"}).scale == "small"


# ----------------------------------------------------------------------------- the lane itself
def test_the_unit_lane_has_no_server_to_reach():
    """``make test-unit`` points DATABASE_URL at a closed port: the public face imports, nothing connects."""
    import os

    import helpers
    from helpers import WorkbookError

    if os.environ.get("WORKBOOK_UNIT_LANE") != "1":
        pytest.skip("only under make test-unit")
    with pytest.raises(WorkbookError, match="Cannot connect"):
        helpers.get_engine()
