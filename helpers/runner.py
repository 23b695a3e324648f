"""Headless runs: execute notebooks in order into output/ (executed .ipynb + HTML); strip outputs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import REPO_ROOT, output_dir

NOTEBOOKS = REPO_ROOT / "notebooks"


def notebooks(selected: list[str] | None = None) -> list[Path]:
    if selected:
        return [Path(p).resolve() for p in selected]
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def run_notebooks(selected: list[str] | None = None, timeout: int = 600) -> int:
    """Execute each notebook top to bottom; stop at the first failure, naming the failing cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    out = output_dir()
    total0 = time.perf_counter()
    for path in notebooks(selected):
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
        t0 = time.perf_counter()
        print(f"▶ {path.name} ...", end="", flush=True)
        failed = None
        try:
            client.execute()
        except CellExecutionError as exc:
            failed = exc
        finally:
            nbformat.write(nb, out / path.name)
            html, _ = HTMLExporter().from_notebook_node(nb)
            (out / path.with_suffix(".html").name).write_text(html)
        if failed is not None:
            idx = next(
                (
                    i
                    for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", []))
                ),
                None,
            )
            ename = str(failed).strip().splitlines()[-1] if str(failed).strip() else type(failed).__name__
            print(f" FAILED in cell {idx} after {time.perf_counter() - t0:.1f}s: {ename}")
            if idx is not None:
                print("---- cell source ----\n" + nb.cells[idx].source[:1500])
            print(f"executed copy: {out / path.name}")
            return 1
        print(f" ok in {time.perf_counter() - t0:.1f}s")
    print(f"all notebooks ran in {time.perf_counter() - total0:.1f}s; HTML and results in {out}")
    return 0


def strip_outputs(paths: list[str]) -> int:
    """Remove outputs and execution counts in place (notebooks are committed without outputs)."""
    import nbformat

    for p in paths:
        nb = nbformat.read(p, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = []
                cell.execution_count = None
            cell.metadata.pop("execution", None)
        nbformat.write(nb, p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_notebooks(sys.argv[1:]))


def write_environment_yml() -> None:
    """environment.yml for conda users: the exact pins of requirements.lock under pip."""
    lock = REPO_ROOT / "requirements.lock"
    pins = [ln.strip() for ln in lock.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    out = (
        [
            "# The same exact set as requirements.lock, for conda users:",
            "#   conda env create -f environment.yml && conda activate qo-workbook",
            "# then run the notebooks with `python -m helpers run` (or `make run PYTHON=python`).",
            "# Kept in sync by `make lock`; tests/test_repo.py checks both list the same packages.",
            "name: qo-workbook",
            "channels:",
            "  - conda-forge",
            "dependencies:",
            "  - python=3.11",
            "  - pip",
            "  - pip:",
        ]
        + [f"      - {p}" for p in pins]
        + ["      - -e .  # the helpers package of this checkout"]
    )
    (REPO_ROOT / "environment.yml").write_text("\n".join(out) + "\n")
