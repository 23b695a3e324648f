"""The run's landing page: chapter HTML with titles and links, and ``output/index.html`` tying them together.

Everything here reads what one ``make run`` wrote (executed notebooks, ``results/*.json``,
``plots/*.png``); nothing is measured, nothing is fetched from the network.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from pathlib import Path

# plots.save(fig, "name"), or a chapter's own show(fig, "name") that calls it
_SAVE = re.compile(r"""(?:plots\.save|\bshow)\(\s*[^,()]+,\s*["']([A-Za-z0-9_\-]+)["']""")
_RECORD = re.compile(r"""\brecord\(\s*["']([a-z0-9_]+)["']""")
_NAV_STYLE = (
    "font:14px/1.4 system-ui,sans-serif;padding:8px 16px;background:#f3f3f3;border-bottom:1px solid #ddd;"
    "display:flex;gap:24px"
)


def chapter_title(nb) -> str:
    """The first markdown heading of a notebook, without its ``#``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "Notebook"


_LEARN = re.compile(r"^>\s*\*\*You'll learn:\*\*\s*(.+)$", re.M)
_TIME = re.compile(r"^>\s*\*\*Time:\*\*\s*(.+)$", re.M)


def chapter_time(nb) -> str:
    """The teaching time the chapter's box states (``> **Time:** about N minutes ...``), or ``""``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found = _TIME.search(cell.source)
            if found:
                return found.group(1).strip()
            return ""
    return ""


def chapter_summary(nb) -> str:
    """One line for the index: the box's "You'll learn", else the first sentence after the title."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found = _LEARN.search(cell.source)
            if found:
                return " ".join(found.group(1).split())
            break
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            paragraphs = [p.strip() for p in cell.source.split("\n\n")]
            body = [p for p in paragraphs if p and not p.startswith("#")]
            if body:
                text = " ".join(body[0].split())
                first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
                return first
    return ""


def plot_names(nb) -> list[str]:
    """Names passed to ``plots.save`` in the notebook's cells (f-string names as patterns)."""
    names = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            names += _SAVE.findall(cell.source)
    return names


def results_topic(nb) -> str | None:
    """The topic the notebook records its results under (``record("topic", ...)``), if any."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            found = _RECORD.search(cell.source)
            if found:
                return found.group(1)
    return None


def _nav(prev: tuple[str, str] | None, nxt: tuple[str, str] | None) -> str:
    parts = ['<a href="index.html">↑ all chapters</a>']
    if prev:
        parts.append(f'<a href="{html.escape(prev[0])}">← {html.escape(prev[1])}</a>')
    if nxt:
        parts.append(f'<a href="{html.escape(nxt[0])}">{html.escape(nxt[1])} →</a>')
    return f'<nav style="{_NAV_STYLE}">' + "".join(parts) + "</nav>"


# JupyterLab's HTML template without its scripts from CDNs (require.js, MathJax, Mermaid, the widget
# manager from unpkg): the pages are static (tables, images, text; widgets keep their text fallback,
# which the kernel records beside the widget), so they read the same offline.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def _exporter():
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(
        extra_loaders=[DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})], template_file="offline.html.j2"
    )


def export_html(nb, title: str, prev: tuple[str, str] | None = None, nxt: tuple[str, str] | None = None) -> str:
    """The notebook as HTML, titled after its chapter, with links to the index and its neighbours."""
    body, _ = _exporter().from_notebook_node(nb, resources={"metadata": {"name": title}})
    nav = _nav(prev, nxt)
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)
    return re.sub(r"(</body>)", lambda m: nav + m.group(1), body, count=1)


def _figures(data: dict, limit: int = 6) -> list[tuple[str, str]]:
    """Key figures of a results file: its declared conclusions, else its top-level scalars."""
    source = data.get("conclusions") or {k: v for k, v in data.items() if k != "meta"}
    out = []
    for key, value in source.items():
        if isinstance(value, bool | int | float | str) and value is not None:
            shown = f"{value:,.3g}" if isinstance(value, float) else str(value)
        elif isinstance(value, list) and len(value) <= 6 and all(isinstance(v, str | int) for v in value):
            shown = " < ".join(map(str, value))
        else:
            continue
        out.append((key.replace("_", " "), shown[:80]))
        if len(out) >= limit:
            break
    return out


def _inline(text: str) -> str:
    """Escaped text with Markdown's inline `code` as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def build_index(out: Path, chapters: list[dict], meta: dict) -> Path:
    """Write ``out/index.html``: chapters in order, one-line summary, time, key figures, plot thumbnails.

    ``chapters``: dicts with ``file`` (the HTML's name), ``title``, ``summary``, ``seconds``, ``status``,
    ``topic`` (the results file's stem, or None) and ``plots`` (names).
    """
    out = Path(out)
    rows = []
    for ch in chapters:
        figures = ""
        if ch.get("topic") and (out / "results" / f"{ch['topic']}.json").exists():
            data = json.loads((out / "results" / f"{ch['topic']}.json").read_text())
            items = "".join(f"<li>{html.escape(k)}: <b>{html.escape(v)}</b></li>" for k, v in _figures(data))
            figures = f"<ul class=figs>{items}</ul>" if items else ""
        thumbs = "".join(
            f'<a href="plots/{html.escape(p)}.png"><img src="plots/{html.escape(p)}.png" alt="{html.escape(p)}"></a>'
            for p in ch.get("plots", [])
            if (out / "plots" / f"{p}.png").exists()
        )
        status = ch.get("status") or "not run in this run"
        about = [f"{status} in {ch['seconds']:.0f} s" if ch.get("seconds") is not None else status]
        if ch.get("time"):
            about.append(f"teaching time: {ch['time']}")
        title = html.escape(ch["title"])
        if (out / ch["file"]).exists():  # no link to a page this folder does not hold
            title = f'<a href="{html.escape(ch["file"])}">{title}</a>'
        rows.append(
            f"<section><h2>{title}</h2>"
            f"<p>{_inline(ch.get('summary', ''))}</p>"
            f"<p class=meta>{_inline(' · '.join(about))}</p>"
            f"{figures}<div class=thumbs>{thumbs}</div></section>"
        )
    facts = " · ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in meta.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Query Optimization Workbook: this run</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222 }}
section {{ border-top: 1px solid #ddd; padding: .5em 0 1em }}
h2 {{ font-size: 1.15em; margin: .4em 0 }}
.meta {{ color: #666; font-size: .9em; margin: .2em 0 }}
.figs {{ columns: 2; font-size: .9em }}
.thumbs img {{ height: 120px; margin: 4px; border: 1px solid #ddd }}
</style></head><body>
<h1>Query Optimization Workbook: this run</h1>
<p class=meta>{facts}</p>
{"".join(rows)}
<p class=meta>Written {dt.datetime.now(dt.UTC).isoformat(timespec="seconds")} by <code>make run</code>.</p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
