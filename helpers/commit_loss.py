"""A TCP proxy in front of the server that loses the reply to a COMMIT: the outcome unknown to the client.

Chapter 05b's retry lesson needs the one failure a retry cannot see through: the connection drops
after the server committed and before the client heard so. ``CommitReplyDropper`` listens on a free
local port and forwards bytes both ways; once ``arm()``-ed, the next simple-protocol ``COMMIT`` a
client sends goes to the server, and the server's reply (sent only once the commit is done) is
dropped and both sockets closed. The client sees a lost connection; the server kept the commit.
Clients must connect without TLS (``sslmode=disable``) so the proxy can see the ``COMMIT``.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from sqlalchemy.engine import URL

# a simple-protocol Query message: 'Q', length 4 + len("COMMIT\0") = 11, the text (what psycopg's commit() sends)
COMMIT_QUERY = b"Q\x00\x00\x00\x0bCOMMIT\x00"


class CommitReplyDropper:
    """Forward ``127.0.0.1:<port>`` to the server; when armed, drop the reply to the next COMMIT and cut the line."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._armed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.dropped = 0  # replies to COMMIT dropped so far
        self._closed = False
        threading.Thread(target=self._accept, name="wb_pool_proxy", daemon=True).start()

    def url(self, url: URL) -> URL:
        """``url`` through this proxy, without TLS."""
        return url.set(host="127.0.0.1", port=self.port, query={**dict(url.query), "sslmode": "disable"})

    def arm(self) -> None:
        """Drop the reply to the next COMMIT that passes (one only)."""
        self._armed.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            cut = threading.Event()  # set when this connection's next server reply is to be dropped
            threading.Thread(target=self._upstream, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, cut), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self._armed.is_set() and COMMIT_QUERY in data:
                    self._armed.clear()
                    cut.set()  # before the server can answer
                server.sendall(data)
        self._close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if cut.is_set():  # the server's answer to the COMMIT: it committed; the client never hears
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        self._close(client, server)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        """Stop listening and cut every connection still open through the proxy."""
        self._closed = True
        self._listener.close()
        with self._lock:
            socks, self._sockets = self._sockets, []
        self._close(*socks)

    def __enter__(self) -> CommitReplyDropper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
