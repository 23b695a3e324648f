"""Command line: ``python -m helpers db start|stop|status|url|log``, ``seed``, ``reset``, ``bench``, ``run``."""

from __future__ import annotations

import argparse
import json
import sys

from .config import SCALES, WorkbookError


def _db(action: str) -> int:
    from . import server
    from .database import database_url, is_embedded, masked

    if action in ("start", "stop", "log") and not is_embedded():
        print(
            f"DATABASE_URL is set ({masked(database_url())}): the workbook starts nothing; "
            "manage that server yourself.",
            file=sys.stderr,
        )
        return 0 if action != "log" else 1
    if action == "start":
        import time

        from .config import settings

        settings().db_name  # noqa: B018 - a bad WORKBOOK_DB stops here, before the server starts
        t0 = time.perf_counter()
        info = server.start()
        database_url()  # creates the workbook database
        print(
            f"PostgreSQL {info.major} running on 127.0.0.1:{info.port} (pid {info.pid}, data {info.data_dir}) "
            f"in {time.perf_counter() - t0:.2f}s"
        )
    elif action == "stop":
        print("stopped" if server.stop() else "not running")
    elif action == "status":
        if not is_embedded():
            print(json.dumps({"kind": "DATABASE_URL", "url": masked(database_url()), "reachable": True}))
        else:
            info = server.status()
            print(json.dumps(info.as_dict(), indent=2))
            return 0 if info.running else 3
    elif action == "url":
        print(database_url().render_as_string(hide_password=False))
    elif action == "log":
        print(server.status().log)
    return 0


def _refused(exc: BaseException) -> str | None:
    """One paragraph for a seed/reset that the server refused for lack of privilege, else None."""
    import psycopg

    from .database import database_url, masked

    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    if not isinstance(orig, psycopg.errors.InsufficientPrivilege):
        return None
    first = (str(orig).strip().splitlines() or ["permission denied"])[0]
    return (
        f"PostgreSQL refused: {first}. In {masked(database_url())} this role may not change what another "
        "role created, so it cannot seed or reset there. Point DATABASE_URL or WORKBOOK_DB at a database you own."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    db = sub.add_parser("db", help="embedded server lifecycle")
    db.add_argument("action", choices=["start", "stop", "status", "url", "log"])
    sd = sub.add_parser("seed", help="build the schema and load deterministic data")
    sd.add_argument("--scale", choices=list(SCALES), default=None)
    sd.add_argument("--force", action="store_true", help="seed even beside tables the workbook did not create")
    sd.add_argument("--if-needed", action="store_true", help="do nothing when this scale is already seeded")
    rs = sub.add_parser("reset", help="drop what the workbook owns and seed again")
    rs.add_argument("--scale", choices=list(SCALES), default=None)
    rs.add_argument("--force", action="store_true")
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["seed"])
    bench.add_argument("--scale", choices=list(SCALES), default="ci")
    bench.add_argument("--rounds", type=int, default=3, help="runs of each command (medians and spread)")
    run = sub.add_parser("run", help="execute every notebook in order into output/")
    run.add_argument("notebooks", nargs="*")
    cr = sub.add_parser("compare-results", help="compare two runs' results folders on their declared conclusions")
    cr.add_argument("a")
    cr.add_argument("b")
    sub.add_parser("lock-env", help="write environment.yml from requirements.lock")
    st = sub.add_parser("strip", help="remove outputs from notebooks (they are committed without)")
    st.add_argument("notebooks", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command in ("seed", "reset", "run") and not getattr(args, "scale", None):
            from .config import settings

            settings().scale  # noqa: B018 - a bad WORKBOOK_SCALE stops here, before anything starts
        if args.command == "db":
            return _db(args.action)
        if args.command in ("seed", "reset"):
            from . import seed
            from .database import get_engine

            engine = get_engine()
            try:
                if args.command == "seed" and args.if_needed:
                    done = seed.ensure_seeded(engine, args.scale, progress=True)
                    print("seeded" if done else "already seeded")
                    return 0
                fn = seed.seed if args.command == "seed" else seed.reset
                res = fn(engine, scale=args.scale, force=args.force, progress=True)
            except KeyboardInterrupt as exc:  # Ctrl-C: the seed says what it kept (nothing)
                interrupted = isinstance(exc, seed.SeedInterrupted)
                print(
                    str(exc) if interrupted else "interrupted: run it again (an incomplete seed is redone)",
                    file=sys.stderr,
                )
                return 130
            print(
                f"{res['scale']}: {res['rows']:,} rows in {res['seconds']:.1f}s "
                f"({res['rows'] / res['seconds']:,.0f} rows/s)"
            )
            for table, n in res["tables"].items():
                print(f"  {table:<12} {n:>12,}")
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in res["stages"].items())
            print(f"  time per stage, summed over the {res['lanes']} lanes: {stages}")
            return 0
        if args.command == "bench":
            from .bench import bench_seed

            bench_seed(args.scale, rounds=args.rounds)
            return 0
        if args.command == "run":
            from .runner import run_notebooks

            return run_notebooks(args.notebooks)
        if args.command == "compare-results":
            from .results import compare_results

            diffs = compare_results(args.a, args.b)
            for line in diffs:
                print(line)
            print(f"{len(diffs)} differing conclusion(s)" if diffs else "every declared conclusion agrees")
            return 1 if diffs else 0
        if args.command == "lock-env":
            from .runner import write_environment_yml

            write_environment_yml()
            return 0
        if args.command == "strip":
            from .runner import strip_outputs

            return strip_outputs(args.notebooks)
    except WorkbookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        refused = _refused(exc) if args.command in ("seed", "reset") else None
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
