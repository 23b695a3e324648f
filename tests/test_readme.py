"""The README's first code block is what a newcomer types first: it must get them to a running chapter."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _first_code_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S)
    assert block, "the README has no shell code block"
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.split("#")[0].strip()]


def test_the_readme_first_code_block_runs_a_chapter_into_output(tmp_path):
    commands = _first_code_block()
    assert commands and all(c.startswith("make ") for c in commands), commands
    out = tmp_path / "output"  # the plugin's scratch output would do too; this one is the test's own
    env = {**os.environ, "WORKBOOK_OUTPUT": str(out)}
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    index = (out / "index.html").read_text()
    ran = sorted(p.name for p in out.glob("*.html") if p.name != "index.html")
    assert ran and all(name in index for name in ran), (ran, "not linked from index.html")
    assert any(name.startswith("00_") for name in ran)
