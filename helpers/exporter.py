"""The workbook's one Prometheus exporter, shared by chapters 05 (pools) and 09 (monitoring).

Everything lives in a ``CollectorRegistry`` of its own, never prometheus_client's global one, so two
chapters (or two tests) in one process never see each other's samples.

* ``PoolCollector``: gauges of a SQLAlchemy pool read at scrape time (size, checked out, checked in,
  overflow, capacity), plus the connect / checkout / invalidate counters of a ``pooling.PoolEventLog``.
* ``Exporter``: one registry with the pool collector and, optionally, per-route request metrics
  (requests, SQL statements, a histogram of database time per request) fed by
  ``monitoring.QueryMetricsMiddleware(on_request=exporter.observe)``.
* ``pool_metrics`` / ``metrics_text`` / ``parse_metrics``: chapter 05's short form (a registry with
  the pool only; its text exposition; the text parsed back into ``{'name{labels}': value}``).
* ``serve_in_workers``: chapter 09's several worker processes (as gunicorn runs an app), each with
  an ``Exporter`` of its own, optionally in prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pandas as pd
from sqlalchemy import Engine

from .config import WorkbookError
from .pooling import pool_status

DEFAULT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5)


class PoolCollector:
    """A prometheus_client collector reading the pool (and an optional ``PoolEventLog``) at scrape time."""

    def __init__(self, engine: Engine, name: str, log=None):
        self.engine, self.name, self.log = engine, name, log

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = pool_status(self.engine)
        gauges = {
            "size": ("Configured pool_size", st.size),
            "checked_out": ("Connections checked out of the pool", st.checked_out),
            "checked_in": ("Idle connections held in the pool", st.checked_in),
            "overflow": ("Connections beyond pool_size (negative: not yet opened)", st.overflow),
            "capacity": ("pool_size + max_overflow", st.capacity),
        }
        for key, (doc, value) in gauges.items():
            if value is not None:
                g = GaugeMetricFamily(f"sqlalchemy_pool_{key}", doc, labels=["pool"])
                g.add_metric([self.name], value)
                yield g
        if self.log is not None:
            counts = self.log.counts()
            for key in ("connect", "checkout", "invalidate"):
                c = CounterMetricFamily(f"sqlalchemy_pool_{key}s", f"Pool {key} events", labels=["pool"])
                c.add_metric([self.name], counts.get(key, 0))
                yield c


class Exporter:
    """One registry of its own: the pool of ``engine`` (when given) and, with ``requests=True``, request metrics.

    Request metrics are labelled by ``route`` (the route template a request matched, e.g. ``/posts/{id}``,
    never the raw path: a label value per URL would be a time series per URL) and ``status``.
    ``.text()`` is what a ``/metrics`` endpoint serves; ``.samples()`` and ``.values()`` parse it back.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        pool_name: str = "workbook",
        *,
        log=None,
        requests: bool = True,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        if engine is not None:
            self.registry.register(PoolCollector(engine, pool_name, log))
        self.requests = self.statements = self.db_time = None
        if requests:
            reg = self.registry
            self.requests = Counter("app_requests", "HTTP requests", ["route", "status"], registry=reg)
            self.statements = Counter("app_db_statements", "SQL statements sent", ["route"], registry=reg)
            self.db_time = Histogram(
                "app_db_time_seconds", "database time per request", ["route"], buckets=tuple(buckets), registry=reg
            )

    def observe(self, stats) -> None:
        """Record one request (``route``, ``status``, ``queries``, ``db_time_s``): pass as ``on_request=``."""
        if self.requests is None:
            raise ValueError("this Exporter was made with requests=False")
        self.requests.labels(stats.route, str(stats.status)).inc()
        self.statements.labels(stats.route).inc(stats.queries)
        self.db_time.labels(stats.route).observe(stats.db_time_s)

    def text(self) -> str:
        """The Prometheus text exposition format, as a /metrics endpoint would serve it."""
        return metrics_text(self.registry)

    def values(self) -> dict:
        """``{'name{label="v",...}': value}`` of every sample."""
        return parse_metrics(self.text())

    def samples(self) -> pd.DataFrame:
        """Every sample of the registry (name, labels, value), parsed back from the text format."""
        from prometheus_client.parser import text_string_to_metric_families

        rows = [
            {"name": s.name, "labels": dict(s.labels), "value": s.value}
            for fam in text_string_to_metric_families(self.text())
            for s in fam.samples
        ]
        return pd.DataFrame(rows, columns=["name", "labels", "value"])


def pool_metrics(engine: Engine, name: str = "workbook", log=None):
    """A CollectorRegistry of its own (not the global one) exposing ``engine``'s pool (and ``log``'s counters)."""
    return Exporter(engine, name, log=log, requests=False).registry


def metrics_text(registry) -> str:
    """The registry in Prometheus text exposition format (what a /metrics endpoint returns)."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def parse_metrics(text_format: str) -> dict:
    """Sample name (with its labels) -> value, parsed back from the text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text_format):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _serve_in_worker(url: str, path: str, requests: int, multiproc_dir: str | None, out) -> None:
    """One worker process (spawned: a fresh interpreter, as a gunicorn worker's app is its own)."""
    from prometheus_client import values

    assert (values.ValueClass is not values.MutexValue) == bool(multiproc_dir), "the worker's mode"
    from sqlalchemy import create_engine

    from . import monitoring as mon

    engine = create_engine(url, pool_size=1)
    exporter = Exporter(requests=True)
    app = mon.QueryMetricsMiddleware(mon.blog_app(engine), engine, on_request=exporter.observe)
    try:
        for _ in range(requests):
            mon.wsgi_get(app, path)
        own = exporter.samples()  # what this worker's own /metrics would serve
    finally:
        app.close()
        engine.dispose()

    def total(name: str) -> int:
        return int(own.loc[own["name"] == name, "value"].sum())

    out.put(
        {
            "pid": os.getpid(),
            "requests": total("app_requests_total"),
            "statements": total("app_db_statements_total"),
        }
    )


def serve_in_workers(
    engine: Engine, path: str, *, workers: int = 2, requests: int = 10, multiproc_dir: str | None = None
) -> list[dict]:
    """Serve ``requests`` GETs of ``path`` in each of ``workers`` processes; each worker's own view of its metrics.

    Each worker runs the blog app behind ``monitoring.QueryMetricsMiddleware`` with an ``Exporter`` of
    its own on its own engine, as a gunicorn worker would. With ``multiproc_dir``, every worker runs
    in prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the import) and
    writes its samples to files there, which ``MultiProcessCollector`` sums. Returns, per worker, its
    pid and the request and statement totals its own registry reports. Every wait is bounded (2 min).
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    url = engine.url.render_as_string(hide_password=False)
    procs = [
        ctx.Process(target=_serve_in_worker, args=(url, path, requests, multiproc_dir, out), daemon=True)
        for _ in range(workers)
    ]
    # The workers' environment, as a start-up script sets it (prometheus_client's advice): the variable
    # must be there before the library is imported, and a spawned worker imports it while unpickling.
    key, before = "PROMETHEUS_MULTIPROC_DIR", os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    try:
        if multiproc_dir:
            os.environ[key] = multiproc_dir
        else:
            os.environ.pop(key, None)
        for p in procs:
            p.start()
    finally:  # this process's own environment as it was
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    import queue
    import time

    results: list[dict] = []
    deadline = time.monotonic() + 120
    try:
        while len(results) < workers:
            try:
                results.append(out.get(timeout=0.5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise WorkbookError(
                        f"{len(results)} of {workers} worker processes reported (exit codes {dead}, "
                        "waited at most 120 s): their error is printed above."
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(results, key=lambda r: r["pid"])
