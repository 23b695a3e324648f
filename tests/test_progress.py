"""helpers.progress (helpers/progressbar.py): one closing line in a headless run, tqdm's bar where a frontend watches."""

from __future__ import annotations

from helpers import progress


def test_a_headless_run_prints_one_line_when_done(monkeypatch, capsys):
    monkeypatch.setenv("WORKBOOK_HEADLESS", "1")
    assert list(progress(range(3), desc="counting rows", unit="table")) == [0, 1, 2]
    with progress(total=20_000, desc="backfill", unit="row") as bar:
        for _ in range(4):
            bar.update(5_000)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" in ")[0] for ln in lines] == ["counting rows: 3 tables", "backfill: 20,000 rows"]


def test_with_a_frontend_it_is_tqdms_bar(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("WORKBOOK_HEADLESS", raising=False)
    bar = progress(range(2), desc="x")
    assert isinstance(bar, tqdm)
    bar.close()


def test_the_one_line_spells_the_plural_of_its_unit(monkeypatch, capsys):
    from helpers.progressbar import HEADLESS_ENV, progress

    monkeypatch.setenv(HEADLESS_ENV, "1")
    for unit in ("selectivity", "query", "key"):
        for _ in progress(range(2), desc="sweep", unit=unit):
            pass
    out = capsys.readouterr().out
    assert "2 selectivities in" in out and "2 queries in" in out and "2 keys in" in out, out
