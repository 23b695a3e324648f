"""Headless runs: execute notebooks in order into output/ (executed .ipynb + HTML); strip outputs.

One run at a time per output folder (a lock, ``output/.run.lock``, names the run holding it). Each
notebook runs in a kernel of its own, driven from a worker thread, so that SIGINT or SIGTERM reaches
this process at once: the kernel is then interrupted (SIGINT to its process group, as Jupyter's
interrupt button does), killed if it does not stop within ``STOP_GRACE_S``, and what that notebook
made and could not remove is removed here, whether the notebook passed, failed or was stopped:
throwaway servers its kernel owned (``pooling.reap_throwaways``) and the databases it created
(recorded through ``WORKBOOK_RUN_RECORD``, dropped by ``database.drop_recorded`` only while their
OID and marker prove they are the ones it made). Exit code 130 after SIGINT, 143 after SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .config import REPO_ROOT, WorkbookError, output_dir
from .processes import alive

NOTEBOOKS = REPO_ROOT / "notebooks"
LOCK_NAME = ".run.lock"
STOP_GRACE_S = 15.0  # after the interrupt, how long the kernel may take to stop before it is killed


def notebooks(selected: list[str] | None = None) -> list[Path]:
    """The chapters to run, in reading order: all of them, or those ``selected`` names.

    A selection names notebook files, or chapters by number: ``00`` is ``notebooks/00_*.ipynb``, and
    ``01`` is every notebook of chapter 01 (``01a_...``, ``01b_...`` when it is split in two).
    """
    if not selected:
        return _chapter_files()
    paths, missing = [], []
    for name in selected:
        if name.endswith(".ipynb"):
            path = Path(name).resolve()
            found = [path] if path.is_file() else []
        else:
            found = [p for p in _chapter_files() if p.name.split("_")[0].startswith(name)]
        paths += found
        if not found:
            missing.append(name)
    if missing:
        numbers = " ".join(p.name.split("_")[0] for p in _chapter_files())
        raise WorkbookError(
            f"No such notebook or chapter: {', '.join(missing)}. "
            f"Name chapters by number ({numbers}) or .ipynb files, e.g. notebooks/00_setup_and_seed.ipynb."
        )
    return paths


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold the run lock of the output folder, or say which process holds it (WorkbookError)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / LOCK_NAME, "a+")
    except OSError as exc:
        raise WorkbookError(
            f"Cannot write the run lock in {out}: {exc.strerror}. Set WORKBOOK_OUTPUT to a folder you can write."
        ) from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise WorkbookError(
                f"Another `helpers run` (pid {holder}) is writing to {out}; this run would overwrite its "
                "notebooks. Wait for it to end (or stop it), or give this run a folder of its own: "
                "WORKBOOK_OUTPUT=/some/folder python -m helpers run"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


_pending: list[int] = []  # signals received during the run, in order (the handler only notes them)


def _remember(signum, _frame):
    _pending.append(signum)


def _our_kernel(pid: int) -> bool:
    """The process is a kernel this process started (jupyter_client gives it JPY_PARENT_PID=<us>), not
    a stranger that got the number after the kernel was reaped."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"JPY_PARENT_PID={os.getpid()}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


class _Execution:
    """One notebook executing in a worker thread; the main thread waits and can stop it."""

    def __init__(self, client, stderr=None):
        self.client = client
        self.stderr = stderr  # the kernel process's own stderr (not its cells' output): a file of the run
        self.cell: int | None = None
        self.kernel_pid: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="helpers-run", daemon=True)

    def _pid(self) -> int | None:
        if self.kernel_pid is None:
            provisioner = getattr(self.client.km, "provisioner", None)
            self.kernel_pid = getattr(provisioner, "pid", None)
        return self.kernel_pid

    def on_cell_start(self, cell, cell_index):
        self.cell = cell_index
        self._pid()

    def _run(self):
        try:
            self.client.execute(**({"stderr": self.stderr} if self.stderr is not None else {}))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    def start(self):
        self.thread.start()

    def wait(self) -> int | None:
        """Until the notebook ends (None) or a signal arrives (its number)."""
        while self.thread.is_alive():
            if _pending:
                return _pending[0]
            self.thread.join(0.2)
            self._pid()
        return _pending[0] if _pending else None

    def _signal(self, signum: int) -> None:
        pid = self._pid()
        if pid and alive(pid) and _our_kernel(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signum)  # the kernel leads its own session (jupyter_client starts it so)

    def stop(self) -> None:
        """Interrupt the kernel; kill it when it has not finished within STOP_GRACE_S (or at a second signal)."""
        deadline = time.monotonic() + STOP_GRACE_S
        asked = len(_pending)
        interrupted = False
        while self.thread.is_alive() and time.monotonic() < deadline and len(_pending) <= asked:
            if not interrupted and self._pid():
                self._signal(signal.SIGINT)
                interrupted = True
            self.thread.join(0.2)
        if self.thread.is_alive():
            self._signal(signal.SIGKILL)
            self.thread.join(STOP_GRACE_S)

    def ensure_kernel_gone(self) -> None:
        pid = self._pid()
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            self._signal(signal.SIGKILL)


def _cleanup(kernel_pid: int | None, record: Path) -> list[str]:
    """Remove what the notebook's kernel made and left behind; one phrase per thing, errors included."""
    done = []
    root = tempfile.gettempdir()
    if kernel_pid and any(n.startswith("wb-pool-") for n in os.listdir(root)):
        try:
            from .pooling import reap_throwaways

            done += [f"throwaway server {p}" for p in reap_throwaways(owner_pid=kernel_pid)]
        except Exception as exc:  # noqa: BLE001 - reported on the run's line, never a traceback
            done.append(f"could not remove its throwaway server: {_first_line(exc)}")
    from .scratchdb import drop_recorded, read_run_record

    records = read_run_record(record)
    if records:
        try:
            done += [f"database {name}" for name in drop_recorded(records)]
        except Exception as exc:  # noqa: BLE001
            names = ", ".join(sorted({r["database"] for r in records}))
            done.append(f"could not check or drop {names}: {_first_line(exc)}")
    return done


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _error_line(exc: BaseException) -> str:
    """``ename: first line of evalue`` for a failed cell; the exception's class and first line otherwise."""
    ename = getattr(exc, "ename", None)
    if ename:
        evalue = (getattr(exc, "evalue", "") or "").strip()
        return f"{ename}: {evalue.splitlines()[0]}" if evalue else ename
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _error_cell(nb) -> int | None:
    return next(
        (
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", []))
        ),
        None,
    )


def run_notebooks(selected: list[str] | None = None, timeout: int = 600) -> int:
    """Execute each notebook top to bottom; stop at the first failure, naming the failing cell."""
    from .scratchdb import RUN_RECORD_ENV

    paths = notebooks(selected)
    os.environ["WORKBOOK_HEADLESS"] = "1"  # the kernels inherit it: helpers.progress prints one line, no widget
    try:
        out = output_dir()
    except OSError as exc:
        raise WorkbookError(
            f"Cannot create the output folder {exc.filename}: {exc.strerror}. Set WORKBOOK_OUTPUT to a folder "
            "you can write."
        ) from None
    with output_lock(out):
        handlers = {}
        _pending.clear()
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, _remember) for sig in (signal.SIGINT, signal.SIGTERM)}
        run_dir = Path(tempfile.mkdtemp(prefix="wb-run-"))
        previous = os.environ.get(RUN_RECORD_ENV)
        try:
            return _run_all(paths, out, run_dir, timeout)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if previous is None:
                os.environ.pop(RUN_RECORD_ENV, None)
            else:
                os.environ[RUN_RECORD_ENV] = previous
            shutil.rmtree(run_dir, ignore_errors=True)


def _run_all(paths: list[Path], out: Path, run_dir: Path, timeout: int) -> int:
    _ran.clear()
    try:
        return _run_each(paths, out, run_dir, timeout)
    finally:
        _write_index(out)


def _run_each(paths: list[Path], out: Path, run_dir: Path, timeout: int) -> int:
    total0 = time.perf_counter()
    for path in paths:
        if _pending:  # between two notebooks: the next one does not start
            print(f"interrupted ({signal.Signals(_pending[0]).name}) before {path.name}", flush=True)
            return 128 + _pending[0]
        print(f"▶ {path.name} ...", end="", flush=True)
        code = _run_one(path, out, run_dir, timeout)
        if code:
            return code
    if _pending:
        print(f"interrupted ({signal.Signals(_pending[0]).name}) after the last notebook", flush=True)
        return 128 + _pending[0]
    print(f"all notebooks ran in {time.perf_counter() - total0:.1f}s; HTML and results in {out}")
    return 0


def _run_one(path: Path, out: Path, run_dir: Path, timeout: int) -> int:
    import nbformat
    from nbclient import NotebookClient

    from .scratchdb import RUN_RECORD_ENV

    nb = nbformat.read(path, as_version=4)
    record = run_dir / f"{path.stem}.jsonl"
    os.environ[RUN_RECORD_ENV] = str(record)  # the kernel inherits it: databases it makes are noted there
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    # the kernel process's own stderr goes to a file of the run: what a kernel prints while it is shut down
    # (asyncio's "Task was destroyed but it is pending!") is not the learner's business; a crash's last words
    # are shown with the failure below. Cells' output reaches the notebook as always.
    kernel_log = run_dir / f"{path.stem}.kernel.log"
    kernel_stderr = open(kernel_log, "w")  # noqa: SIM115 - closed below, after the kernel is gone
    run = _Execution(client, stderr=kernel_stderr)
    client.on_cell_start = run.on_cell_start
    t0 = time.perf_counter()
    run.start()
    stopped_by = run.wait()
    if stopped_by is not None:
        run.stop()
    # signals from here on are only noted: the cleanup and the executed copy finish first (bounded)
    run.ensure_kernel_gone()
    kernel_stderr.close()
    cleaned = _cleanup(run.kernel_pid, record)
    seconds = time.perf_counter() - t0
    if stopped_by is not None:
        _ran[path.name] = (seconds, f"interrupted ({signal.Signals(stopped_by).name})")
    elif run.error is not None:
        _ran[path.name] = (seconds, f"FAILED in cell {_error_cell(nb)}: {_error_line(run.error)}")
    else:
        _ran[path.name] = (seconds, "ok")
    _write_copy(nb, out / path.name)
    after = f"; removed what it left: {', '.join(cleaned)}" if cleaned else ""
    if stopped_by is not None:
        where = f"cell {run.cell}" if run.cell is not None else "kernel start"
        print(
            f" interrupted ({signal.Signals(stopped_by).name}) at {where} after {seconds:.1f}s; "
            f"kernel stopped{after}; partial copy: {out / path.name}",
            flush=True,
        )
        return 128 + stopped_by
    if run.error is not None:
        idx = _error_cell(nb)
        idx = run.cell if idx is None else idx
        print(f" FAILED in cell {idx} after {seconds:.1f}s: {_error_line(run.error)}{after}")
        if idx is not None:
            print("---- cell source ----\n" + nb.cells[idx].source[:1500])
        if _error_cell(nb) is None:  # no cell failed: the kernel itself died; its last words, if any
            last = [ln for ln in kernel_log.read_text(errors="replace").splitlines() if ln.strip()][-5:]
            if last:
                print("---- the kernel's last words ----\n" + "\n".join(last))
        print(f"executed copy: {out / path.name}")
        return 1
    print(f" ok in {seconds:.1f}s{after}")
    return 0


_ran: dict[str, tuple[float, str]] = {}  # notebook file -> (seconds, status) in this run


def _chapter_files() -> list[Path]:
    """Every chapter notebook in reading order: ``NN_topic`` or, for a chapter split in two, ``NNa_``/``NNb_``."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))


def _write_copy(nb, target: Path) -> None:
    """The executed notebook and its HTML (titled, linked to the index and its neighbours), as far as it ran."""
    import nbformat

    from .report import chapter_title, export_html

    nbformat.write(nb, target)
    names = [p.name for p in _chapter_files()]
    prev = nxt = None
    if target.name in names:
        i = names.index(target.name)
        neighbour = [
            (Path(names[j]).with_suffix(".html").name, chapter_title(nbformat.read(NOTEBOOKS / names[j], 4)))
            for j in (i - 1, i + 1)
            if 0 <= j < len(names)
        ]
        prev = neighbour[0] if i > 0 else None
        nxt = neighbour[-1] if i + 1 < len(names) else None
    target.with_suffix(".html").write_text(export_html(nb, chapter_title(nb), prev, nxt))


def _write_index(out: Path) -> None:
    """``index.html`` of this run: every chapter in order, with what this run did of it."""
    import nbformat

    from .report import build_index, chapter_summary, chapter_time, chapter_title, plot_names, results_topic
    from .results import _meta

    chapters = []
    for path in _chapter_files():
        nb = nbformat.read(path, as_version=4)
        seconds, status = _ran.get(path.name, (None, "not run in this run"))
        chapters.append(
            {
                "file": path.with_suffix(".html").name,
                "title": chapter_title(nb),
                "summary": chapter_summary(nb),
                "time": chapter_time(nb),
                "seconds": seconds,
                "status": status,
                "topic": results_topic(nb) if path.name in _ran else None,
                "plots": plot_names(nb) if path.name in _ran else [],
            }
        )
    try:
        meta = _meta()
    except Exception as exc:  # noqa: BLE001 - the index must not hide the run's own result
        meta = {"meta": f"unavailable ({type(exc).__name__})"}
    shown = {k: meta[k] for k in ("scale", "server_version", "database", "cores", "machine", "commit") if k in meta}
    build_index(out, chapters, shown)


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
            "# then `make run`, `make test` and `make lab` use this environment (detected by its name; or pass",
            "#   VENV=$CONDA_PREFIX) and install nothing into it.",
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
