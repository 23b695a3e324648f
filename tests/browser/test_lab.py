"""JupyterLab as a learner sees it: headless Chromium runs chapters in a real Lab and looks at what renders.

``make test-browser`` runs this (``pytest tests`` deselects it: see ``conftest.py`` here). It needs Debian's
``chromium`` (``.ci/browser-setup`` installs it) driven by Playwright for Python through
``executable_path``: no browser is ever downloaded.

Everything it writes goes into one scratch folder of its own (``WORKBOOK_BROWSER_DIR``, else a new temp
folder), printed at the end and kept for CI artifacts:

- ``lab/notebooks/``: copies of the chapters that Lab opens, runs and autosaves; ``lab/pyproject.toml`` and
  ``lab/data`` link back to the checkout, so the kernel (whose working directory is the notebook's folder)
  finds the ``%sql`` settings and the seed checksums just as it does under ``make lab``;
- ``output/``: the run's ``WORKBOOK_OUTPUT`` (plots, results), never the checkout's ``output/``;
- ``lab.log``, ``console-<chapter>.log``, and the screenshots ``<chapter>-*.png``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("WORKBOOK_CHROMIUM", "/usr/bin/chromium")
# chapter 00 (setup: the %sql magic, plots, a progress bar) and a short chapter with a plot
CHAPTERS = ["00_setup_and_seed.ipynb", "08_testing_strategies.ipynb"]
# generous: the machine may be shared, and a chapter runs for minutes there
LAB_START_S = 180
CHAPTER_S = 900

# Lab user settings for the scratch server: no news or update toasts over the screenshots
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

# console errors that are known and harmless, with the reason. jupysql-plugin 0.4.5 handles its settings signal
# before any notebook is open (`this.panel` is still undefined); its "Format SQL" button appears when one opens.
KNOWN_CONSOLE_ERRORS = ["TypeError: Cannot read properties of undefined (reading 'toolbar')"]

# runs inside the page: the state of every cell of the current notebook, from Lab's own models
CELL_STATE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.map((cell, index) => {
    const m = cell.model;
    const outputs = m.type === 'code' ? m.outputs.toJSON() : [];
    return {
      index, type: m.type, source: m.sharedModel.getSource().slice(0, 80),
      count: m.type === 'code' ? m.executionCount : null,
      running: m.type === 'code' ? m.executionState === 'running' : false,
      errors: outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
    };
  });
  return {path: panel.context.path, kernel: kernel ? kernel.status : 'none', cells};
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scratch() -> Path:
    given = os.environ.get("WORKBOOK_BROWSER_DIR")
    if given:
        path = Path(given).resolve()
        if path.exists() and any(path.iterdir()):
            pytest.fail(f"WORKBOOK_BROWSER_DIR={path} is not empty: give an empty or new folder")
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="wb-browser-"))


def _lab_tree(scratch: Path) -> Path:
    """A copy of the chapters under test, beside links to what their kernels read relative to notebooks/."""
    root = scratch / "lab"
    (root / "notebooks").mkdir(parents=True)
    for name in CHAPTERS:
        shutil.copy2(REPO / "notebooks" / name, root / "notebooks" / name)
    for name in ("pyproject.toml", "data"):
        (root / name).symlink_to(REPO / name)
    return root


@pytest.fixture(scope="module")
def lab():
    scratch = _scratch()
    root = _lab_tree(scratch)
    settings = scratch / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **{k: v for k, v in os.environ.items() if k != "WORKBOOK_HEADLESS"},  # a learner's Lab: bars are widgets
        "WORKBOOK_OUTPUT": str(scratch / "output"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(scratch / "lab-workspaces"),
        "JUPYTER_RUNTIME_DIR": str(scratch / "jupyter-runtime"),
        "PLOOMBER_STATS_ENABLED": "false",
    }
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        f"--ServerApp.root_dir={root / 'notebooks'}",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands as the palette does
    ]  # fmt: skip
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(scratch / "lab.log", "w")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, cwd=root / "notebooks", env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + LAB_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}; see {scratch / 'lab.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {LAB_START_S} s; see {scratch / 'lab.log'}")
                time.sleep(1)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "scratch": scratch, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        print(f"\nbrowser test artifacts (screenshots, logs, WORKBOOK_OUTPUT): {scratch}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Debian's chromium; Playwright passes --no-sandbox itself (chromium_sandbox defaults to False)
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def _checkout_state() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "notebooks"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_and_renders_in_lab(lab, browser, chapter):
    before = _checkout_state()
    scratch, stem = lab["scratch"], chapter.split("_")[0]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    t0 = time.monotonic()
    try:
        # a workspace per chapter: Lab does not restore the previous chapter's tab and kernel
        page.goto(f"{lab['url']}/lab/workspaces/ch{stem}?token={lab['token']}", timeout=LAB_START_S * 1000)
        page.wait_for_function("() => window.jupyterapp !== undefined", timeout=LAB_START_S * 1000)
        page.evaluate("async () => { await window.jupyterapp.started; await window.jupyterapp.restored; }")
        # open the chapter, wait for its kernel, then Lab's own "Run All Cells" (Run menu / command palette)
        page.evaluate(
            """async (path) => {
              const app = window.jupyterapp;
              const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
              await panel.context.ready;
              await panel.sessionContext.ready;
              app.shell.activateById(panel.id);
            }""",
            chapter,
        )
        page.wait_for_function(
            "() => { const p = window.jupyterapp.shell.currentWidget;"
            " return p && p.sessionContext && p.sessionContext.session && p.sessionContext.session.kernel"
            " && p.sessionContext.session.kernel.status === 'idle'; }",
            timeout=LAB_START_S * 1000,
        )
        # outputs a copy may carry (counts from an earlier run) must not pass for this run's
        page.evaluate("async () => { await window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs'); }")
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        # done: the kernel is idle, no cell is queued or running, and every code cell ran or one failed
        state = None
        deadline = time.monotonic() + CHAPTER_S
        while time.monotonic() < deadline:
            state = page.evaluate(CELL_STATE_JS)
            code = [c for c in state["cells"] if c["type"] == "code"]
            failed = any(c["errors"] for c in code)
            if state["kernel"] == "idle" and not any(c["running"] for c in code):
                if failed or all(c["count"] is not None for c in code):
                    break
            time.sleep(2)
        took = time.monotonic() - t0
        page.screenshot(path=str(scratch / f"{stem}-end.png"))
        assert state is not None and state["path"] == chapter, state
        code = [c for c in state["cells"] if c["type"] == "code"]
        errors = [f"cell {c['index']} ({c['source'][:40]!r}): {e}" for c in code for e in c["errors"]]
        assert not errors, "error output in Lab:\n" + "\n".join(errors)
        not_run = [c["index"] for c in code if c["count"] is None]
        assert not not_run, f"{chapter}: cells {not_run} did not run within {CHAPTER_S} s (kernel {state['kernel']})"

        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        tracebacks = panel.locator(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', has_text="Traceback"
        )
        assert tracebacks.count() == 0, tracebacks.first.inner_text()[:2000]

        tip = panel.locator(".jp-OutputArea-output", has_text="Did not find user configurations")
        assert tip.count() == 0, "jupysql did not find [tool.jupysql.SqlMagic] in pyproject.toml"

        # an inline plot, really decoded by the browser
        img = panel.locator(".jp-OutputArea-output img").first
        assert img.count() == 1, "no inline plot (an img in an output area)"
        img.scroll_into_view_if_needed(timeout=30_000)
        assert img.evaluate("i => i.complete && i.naturalWidth > 100"), "the inline plot did not render"
        img.screenshot(path=str(scratch / f"{stem}-plot.png"))

        if stem == "00":
            # the %sql magic's own table: an HTML table in the output of a cell that starts with %sql
            sql_cells = panel.locator(".jp-CodeCell").filter(
                has=page.locator(".jp-InputArea .cm-content", has_text="%sql SELECT")
            )
            table = sql_cells.locator(".jp-OutputArea-output table").first
            assert table.count() == 1, "no HTML table in the output of a %sql cell"
            table.scroll_into_view_if_needed(timeout=30_000)
            assert table.locator("tr").count() > 1, "the %sql table rendered no rows"
            sql_cells.first.screenshot(path=str(scratch / f"{stem}-sql-table.png"))
            # the tqdm.auto progress bar, rendered as a widget (not "Loading widget..." nor a text line)
            bar = panel.locator(".jp-OutputArea-output .widget-hprogress").first
            assert bar.count() == 1, (
                "no progress bar widget: tqdm.auto rendered as text (ipywidgets/jupyterlab_widgets?)"
            )
            bar.scroll_into_view_if_needed(timeout=30_000)
            bar.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')]").first.screenshot(
                path=str(scratch / f"{stem}-progress.png")
            )
        # jupysql-plugin is active (it failed with "No provider for: jupyterWidgetRegistry" without ipywidgets)
        assert panel.locator('[data-testid="format-btn"]').count() == 1, "jupysql-plugin's Format SQL button is missing"
        print(f"\n{chapter}: ran {len(code)} code cells in Lab in {took:.0f} s")
    finally:
        (scratch / f"console-{stem}.log").write_text("\n".join(console) + "\n")
        try:
            page.evaluate("async () => { await window.jupyterapp.shell.currentWidget.sessionContext.shutdown(); }")
        except Exception as exc:  # the page may be what failed; the server's shutdown ends the kernel anyway
            print(f"kernel shutdown from the page failed: {exc}")
        page.close()
    errors = [
        m for m in console if m.startswith(("error:", "pageerror:")) and not any(k in m for k in KNOWN_CONSOLE_ERRORS)
    ]
    assert not errors, "errors in the browser console (extensions that failed to load, ...):\n" + "\n".join(errors)
    assert _checkout_state() == before, "the browser test changed notebooks/ in the checkout"


def test_the_run_index_and_every_page_it_links_work_offline(lab, browser):
    """A run of the same chapters into the scratch folder: index.html opened in Chromium with the network
    cut off, every link followed, every page and image loaded from the run's folder alone."""
    scratch = lab["scratch"]
    out = scratch / "run-output"
    env = {**os.environ, "WORKBOOK_OUTPUT": str(out), "PLOOMBER_STATS_ENABLED": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "helpers", "run", *[c.split("_")[0] for c in CHAPTERS]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=CHAPTER_S,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    remote: list[str] = []

    def only_local(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            remote.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    try:
        index = out / "index.html"
        page.goto(index.as_uri())
        page.screenshot(path=str(scratch / "index.png"), full_page=True)
        hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.getAttribute('href'))")
        local = sorted({h.split("#")[0] for h in hrefs if h and not h.startswith(("http:", "https:", "#"))})
        ran = sorted(p.name for p in out.glob("*.html") if p.name != "index.html")
        assert set(ran) <= set(local), f"chapters of the run not linked from the index: {set(ran) - set(local)}"
        for href in local:
            target = (out / href).resolve()
            assert target.is_file(), f"index.html links to {href}, which the run did not write"
            if target.suffix == ".html":
                page.goto(target.as_uri())
                broken = page.eval_on_selector_all(
                    "img", "is => is.filter(i => !(i.complete && i.naturalWidth > 0)).length"
                )
                assert broken == 0, f"{href}: {broken} image(s) did not load"
                back = page.eval_on_selector_all("a[href]", "as => as.map(a => a.getAttribute('href'))")
                assert "index.html" in back, f"{href} has no link back to the index"
        assert not remote, f"the pages asked the network for: {sorted(set(remote))[:5]}"
    finally:
        page.close()
