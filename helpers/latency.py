"""Network round trip on loopback: a TCP proxy, in a process of its own, that delays every chunk.

On loopback a query round trip costs tens of microseconds, so an N+1 looks cheaper here than in
production, where the database is a network hop away. ``latency_proxy(delay_ms)`` starts this
module as a child process (its own interpreter, so its timers do not queue behind the notebook's
GIL) listening on 127.0.0.1; each chunk read from one side is written to the other ``delay_ms``
later, in order, in both directions, so a round trip gains about ``2 * delay_ms`` while chunks in
flight overlap (a delay, like a network's, not a bandwidth cap). The context manager stops it;
the child also exits when its stdin closes, so it cannot outlive the process that started it.

A bandwidth limit can be added too (``set_bandwidth(mbit)``): each chunk then also waits for the
chunks before it to be "sent" at that rate, so moving more bytes costs more time, as on a real link.

Protocol on the child's stdin/stdout (one line each): ``delay <ms>`` / ``bandwidth <Mbit/s>`` -> ``ok``; ``stats`` ->
JSON byte counters; EOF or ``stop`` -> exit.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_CHUNK = 256 * 1024


# ----------------------------------------------------------------------------- the child process
class _Proxy:
    """Accepts on a local port and relays each connection to the target with a delay per chunk."""

    def __init__(self, target: tuple[str, int], delay_ms: float):
        self.target = target
        self.delay_s = delay_ms / 1e3
        self.bytes_per_s = 0.0  # 0: no bandwidth limit
        self.lock = threading.Lock()
        self.bytes = {"to_server": 0, "to_client": 0}
        self.chunks = {"to_server": 0, "to_client": 0}
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def serve(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.connections += 1
        done = threading.Barrier(2, action=lambda: (client.close(), server.close()))
        for src, dst, name in ((client, server, "to_server"), (server, client, "to_client")):
            q: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._read, args=(src, q, name), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, q, done), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.SimpleQueue, name: str) -> None:
        sent_until = 0.0  # when the link finishes sending what was queued before (bandwidth limit)
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                q.put(None)
                return
            with self.lock:
                self.bytes[name] += len(data)
                self.chunks[name] += 1
            now = time.perf_counter()
            if self.bytes_per_s:
                sent_until = max(now, sent_until) + len(data) / self.bytes_per_s
                now = sent_until
            q.put((now + self.delay_s, data))

    @staticmethod
    def _write(dst: socket.socket, q: queue.SimpleQueue, done: threading.Barrier) -> None:
        while True:
            item = q.get()
            if item is None:
                break
            due, data = item
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            done.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass

    def stats(self) -> dict:
        with self.lock:
            return {
                "bytes": dict(self.bytes),
                "chunks": dict(self.chunks),
                "connections": self.connections,
                "delay_ms": self.delay_s * 1e3,
                "bandwidth_mbit": self.bytes_per_s * 8 / 1e6,
            }


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``latency.py HOST PORT DELAY_MS``; prints the listening port, then obeys stdin."""
    host, port, delay = (argv or sys.argv[1:])[:3]
    try:  # wake up on time on a busy machine (it sleeps nearly all the time); allowed for root only
        os.nice(-5)
    except OSError:
        pass
    proxy = _Proxy((host, int(port)), float(delay))
    threading.Thread(target=proxy.serve, daemon=True).start()
    print(proxy.port, flush=True)
    for line in sys.stdin:  # EOF (the parent closed the pipe or died) ends the loop and the process
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "delay":
            proxy.delay_s = float(arg) / 1e3
            print("ok", flush=True)
        elif cmd == "bandwidth":
            proxy.bytes_per_s = float(arg) * 1e6 / 8
            print("ok", flush=True)
        elif cmd == "stats":
            print(json.dumps(proxy.stats()), flush=True)
        elif cmd == "stop":
            break
    os._exit(0)  # daemon threads may be blocked in recv: leave at once


# ----------------------------------------------------------------------------- the parent's handle
@dataclass
class LatencyProxy:
    """A running proxy: ``.url`` (SQLAlchemy URL through it), ``.make_engine()``, ``.set_delay()``, ``.stats()``."""

    process: subprocess.Popen
    port: int
    delay_ms: float
    target_url: object
    _engines: list = field(default_factory=list)

    @property
    def url(self):
        """The workbook database URL with host and port replaced by the proxy's."""
        return self.target_url.difference_update_query(["host", "port", "hostaddr"]).set(
            host="127.0.0.1", port=self.port
        )

    def _ask(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the latency proxy exited")
        return answer.strip()

    def set_delay(self, delay_ms: float) -> None:
        """Delay per direction for every chunk read from now on (round trip gains about twice this)."""
        if self._ask(f"delay {float(delay_ms)}") != "ok":
            raise RuntimeError("the latency proxy did not accept the delay")
        self.delay_ms = float(delay_ms)

    def set_bandwidth(self, mbit_per_s: float) -> None:
        """Limit each direction to ``mbit_per_s`` megabits per second (0: unlimited), like a slower link."""
        if self._ask(f"bandwidth {float(mbit_per_s)}") != "ok":
            raise RuntimeError("the latency proxy did not accept the bandwidth")

    def stats(self) -> dict:
        """Bytes and chunks relayed so far in each direction, connections accepted, current delay."""
        return json.loads(self._ask("stats"))

    def make_engine(self, **kw):
        """A new Engine connecting through the proxy; disposed when the proxy stops."""
        from sqlalchemy import create_engine

        engine = create_engine(self.url, **kw)
        self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout:
            self.process.stdout.close()


def start_proxy(delay_ms: float = 0.0, *, url=None) -> LatencyProxy:
    """Start a proxy to the workbook database (or ``url``) adding ``delay_ms`` per direction; caller closes it."""
    from sqlalchemy.engine import make_url

    from .database import database_url

    target = make_url(url) if url is not None else database_url()
    host = target.host or "127.0.0.1"
    port = target.port or 5432
    # -P: do not put helpers/ itself on sys.path; the child needs only the standard library
    proc = subprocess.Popen(
        [sys.executable, "-P", str(Path(__file__).resolve()), host, str(port), str(float(delay_ms))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait(timeout=5)
        raise RuntimeError(f"the latency proxy did not start (said {line!r})")
    return LatencyProxy(proc, int(line), float(delay_ms), target)


@contextmanager
def latency_proxy(delay_ms: float = 0.0, *, url=None):
    """Context manager: a proxy adding ``delay_ms`` each way; stopped (and its engines disposed) on exit.

    >>> with latency_proxy(0.5) as proxy:
    ...     engine = proxy.make_engine()
    ...     round_trip_ms(engine)   # about 1 ms more than direct
    """
    proxy = start_proxy(delay_ms, url=url)
    try:
        yield proxy
    finally:
        proxy.close()


def round_trip_ms(engine, repeat: int = 30) -> float:
    """Median wall time of ``SELECT 1`` on one pooled connection, in milliseconds (after a warm-up)."""
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        cur = raw.cursor()
        times = []
        for i in range(repeat + 3):
            t0 = time.perf_counter()
            cur.execute("SELECT 1")
            cur.fetchall()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        raw.rollback()
    return statistics.median(times) * 1e3


def tune_round_trip(proxy: LatencyProxy, engine, target_ms: float, tries: int = 3) -> float:
    """Adjust the proxy's delay until ``SELECT 1`` through ``engine`` takes about ``target_ms``; returns the last measurement."""
    if target_ms <= 0:
        proxy.set_delay(0)
        return round_trip_ms(engine)
    proxy.set_delay(0)
    measured = round_trip_ms(engine)
    delay = max(0.0, (target_ms - measured) / 2)
    for _ in range(tries):
        proxy.set_delay(delay)
        measured = round_trip_ms(engine)
        if abs(measured - target_ms) <= 0.05 * target_ms:
            break
        delay = max(0.0, delay + (target_ms - measured) / 2)
    return measured


if __name__ == "__main__":
    sys.exit(main())
