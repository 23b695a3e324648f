"""Does a Python environment made elsewhere (conda, a venv of your own) hold the lock's pins?

Run by path, not as ``helpers.envcheck``: it must work before anything the workbook needs is
importable. ``make`` runs it when ``VENV`` names such an environment (``make run VENV=$CONDA_PREFIX``);
it installs nothing, and says what to run when a pin is missing or differs.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def problems(lock: Path) -> list[str]:
    """One line per pin of ``lock`` that this interpreter's environment lacks or holds at another version."""
    have = {_norm(d.metadata["Name"] or ""): d.version for d in metadata.distributions()}
    out = []
    for line in lock.read_text().splitlines():
        m = _PIN.match(line.strip())
        if not m:
            continue
        name, want = m.groups()
        got = have.get(_norm(name))
        if got is None:
            out.append(f"{name}=={want} is missing")
        elif got != want:
            out.append(f"{name} is {got}, the lock pins {want}")
    return out


def main() -> int:
    lock = Path(sys.argv[1] if len(sys.argv) > 1 else "requirements.lock")
    if sys.version_info < (3, 11):  # noqa: UP036 - a conda env of another Python gets a message, not a SyntaxError
        print(f"{sys.executable} is Python {sys.version.split()[0]}; the workbook needs 3.11+", file=sys.stderr)
        return 1
    found = problems(lock)
    if not found:
        return 0
    shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    print(
        f"The environment at {sys.prefix} does not match {lock.name}: {shown}.\n"
        "Update it (conda: `conda env update -f environment.yml`; a venv: "
        f"`{sys.executable} -m pip install -r {lock.name}`), or drop VENV= to use the checkout's .venv.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
