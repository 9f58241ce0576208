"""A loopback websocket server that replays recorded frames, with hooks for faults.

Each connection plays one :class:`Session` (the i-th connection the i-th session; the last one
repeats, or pass a function of the connection index): frames ``start..stop`` of the list, with
extra raw frames injected before chosen indexes, then ``close`` (with a code) or ``hold`` (stay
open and silent -- tornado still answers the client's pings, and with ``ping_interval_s`` the
server pings the client). A session can instead refuse the client: an HTTP status at the
handshake, or a close code right after it (what a venue does on bad auth).

Examples
--------
>>> server = WsServer(["a", "b", "c"], [Session(stop=2, then="close"), Session(start=1)]).start()
>>> server.url.startswith("ws://127.0.0.1:")
True
>>> server.stop()
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketClosedError, WebSocketHandler


def capture_frames(path: str | Path) -> list[str]:
    """The ``frame`` of every line of a ``{"recv_ts": ..., "frame": ...}`` capture, as sent."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.dumps(json.loads(line)["frame"], separators=(",", ":")))
    return out


@dataclass
class Session:
    """What the server does on one connection.

    start, stop : the slice of frames to send.
    then : after the frames, ``"close"`` (with ``close_code``/``close_reason``) or ``"hold"``.
    inject : raw frames (str, or bytes for a binary frame) sent before frame index ``i``.
    interval_s : pause between frames.
    refuse_status : answer the handshake with this HTTP status instead of upgrading.
    refuse_code : upgrade, then close at once with this code (and ``close_reason``).
    """

    start: int = 0
    stop: int | None = None
    then: str = "hold"
    close_code: int | None = None
    close_reason: str | None = None
    inject: dict[int, list[str | bytes]] = field(default_factory=dict)
    interval_s: float = 0.0
    refuse_status: int | None = None
    refuse_code: int | None = None


@dataclass
class Connection:
    """What the server saw of one client connection."""

    index: int
    uri: str
    opened: float
    sent: int = 0
    pongs: int = 0
    received: list = field(default_factory=list)
    closed: float | None = None

    @property
    def streams(self) -> list[str]:
        """The ``streams=`` of a Binance combined-stream URL."""
        query = self.uri.partition("?")[2]
        for part in query.split("&"):
            if part.startswith("streams="):
                return part[len("streams="):].split("/")
        return []


class _Handler(WebSocketHandler):
    def initialize(self, server: WsServer) -> None:
        self.server = server
        self.conn: Connection | None = None

    async def get(self, *args, **kwargs):
        with self.server.lock:
            index = len(self.server.connections)
            self.conn = Connection(index, self.request.uri, time.monotonic())
            self.server.connections.append(self.conn)
        self.session = self.server.session(index)
        if self.session.refuse_status is not None:
            self.set_status(self.session.refuse_status)
            self.finish("refused")
            return
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args, **kwargs) -> None:
        if self.session.refuse_code is not None:
            self.close(self.session.refuse_code, self.session.close_reason)
            return
        IOLoop.current().spawn_callback(self._play)

    async def _play(self) -> None:
        s = self.session
        frames = self.server.frames
        stop = len(frames) if s.stop is None else s.stop
        try:
            for i in range(s.start, stop):
                for extra in s.inject.get(i, []):
                    await self.write_message(extra, binary=isinstance(extra, bytes))
                await self.write_message(frames[i])
                self.conn.sent += 1
                if s.interval_s:
                    await asyncio.sleep(s.interval_s)
            for extra in s.inject.get(stop, []):
                await self.write_message(extra, binary=isinstance(extra, bytes))
        except WebSocketClosedError:
            return
        if s.then == "close":
            self.close(s.close_code, s.close_reason)

    def on_message(self, message) -> None:
        self.conn.received.append(message)

    def on_pong(self, data: bytes) -> None:
        self.conn.pongs += 1

    def on_close(self) -> None:
        if self.conn is not None:
            self.conn.closed = time.monotonic()


class WsServer:
    """Serve ``frames`` on ``ws://127.0.0.1:<free port>/stream`` from its own IOLoop thread.

    Parameters
    ----------
    frames : text frames, in order (:func:`capture_frames` reads a capture).
    sessions : per connection, in order (the last repeats), or ``f(connection index)``.
    ping_interval_s : the server pings each client this often (None: never); a client that
        does not answer within 10 s is dropped.
    """

    def __init__(self, frames: Sequence[str], sessions: Sequence[Session] | Callable[[int], Session] = (),
                 ping_interval_s: float | None = None):
        self.frames = list(frames)
        self._sessions = sessions if callable(sessions) else (list(sessions) or [Session()])
        self.ping_interval_s = ping_interval_s
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        self.port = 0
        self._loop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: HTTPServer | None = None

    def session(self, index: int) -> Session:
        if callable(self._sessions):
            return self._sessions(index)
        return self._sessions[min(index, len(self._sessions) - 1)]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> WsServer:
        ready = threading.Event()
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]

        def run() -> None:
            async def main() -> None:
                self._loop = IOLoop.current()
                settings = {"websocket_ping_interval": self.ping_interval_s,
                            "websocket_ping_timeout": 10.0,
                            "websocket_max_message_size": 64 << 20}
                app = Application([(r"/.*", _Handler, {"server": self})], **settings)
                self._server = HTTPServer(app)
                self._server.add_sockets(sockets)
                ready.set()
                self._stopped = asyncio.Event()
                await self._stopped.wait()
                self._server.stop()
                await self._server.close_all_connections()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="wsserver", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.add_callback(self._stopped.set)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> WsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_connections(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until ``n`` clients have connected."""
        deadline = time.monotonic() + timeout
        while len(self.connections) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True
