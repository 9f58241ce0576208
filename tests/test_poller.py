"""HttpPoller against a real tornado HTTP server on loopback, on a fake clock."""
from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import deque
from pathlib import Path

import pandas as pd
import pytest
import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer

from conftest import free_port
from flows.feeds.poller import BACKOFF, FAILED, LIVE, STALE, STARTING, HttpPoller, Response
from flows.feeds.psx import PsxBoard
from flows.schema import NS, SymbolTable

DATA = Path(__file__).parent / "data"
BOARD = json.loads((DATA / "psx_board_sample.json").read_text())["data"]
TUE_1000 = int(pd.Timestamp("2021-04-20 10:00", tz="Asia/Karachi").value)


def board(hbl_volume: int) -> bytes:
    return json.dumps([dict(r, volume=hbl_volume) if r["symbol"] == "HBL" else r
                       for r in BOARD]).encode()


class _Script(tornado.web.RequestHandler):
    """Answer each request with the next scripted reply: (status, headers, body, delay_s)."""

    def initialize(self, replies: deque, seen: list) -> None:
        self.replies, self.seen = replies, seen

    async def get(self) -> None:
        self.seen.append(dict(self.request.headers))
        status, headers, body, delay = self.replies.popleft() if self.replies else \
            (503, {}, b"", 0)
        if delay:
            await asyncio.sleep(delay)
        self.set_status(status)
        for k, v in headers.items():
            self.set_header(k, v)
        self.finish(body)


class BoardServer:
    """A tornado server on 127.0.0.1 (free port) in its own thread, serving ``/board``."""

    def __init__(self) -> None:
        self.replies: deque = deque()
        self.seen: list = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/board"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = tornado.web.Application([(r"/board", _Script,
                                        {"replies": self.replies, "seen": self.seen})])
        server = HTTPServer(app)
        server.add_sockets(tornado.netutil.bind_sockets(self.port, "127.0.0.1"))
        self._ready.set()
        await self._stop.wait()
        server.stop()

    def __enter__(self) -> BoardServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None,
              delay: float = 0.0) -> None:
        self.replies.append((status, headers or {}, body, delay))


class FakeClock:
    """Monotonic seconds that only move when the poller sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    def wall_ns(self) -> int:
        return TUE_1000 + int((self.t - 1000.0) * NS)


@pytest.fixture
def server():
    with BoardServer() as s:
        yield s


def make_poller(url: str, clock: FakeClock, parse, **kw) -> HttpPoller:
    kw.setdefault("rng", random.Random(7))
    return HttpPoller(url, parse, interval_s=1.0, clock=clock, sleep=clock.sleep,
                      wall_ns=clock.wall_ns, backoff_base_s=0.5, backoff_cap_s=4.0, **kw)


def test_poller_boards_429_500s_timeout_then_recovers(server):
    clock = FakeClock()
    table = SymbolTable()
    psx = PsxBoard(table)
    poller = make_poller(server.url, clock, psx.parse, timeout_s=0.3)
    assert poller.health["state"] == STARTING
    server.reply(200, board(1_000))
    server.reply(200, board(1_600))
    server.reply(429, b"slow down", {"Retry-After": "2"})
    for _ in range(5):
        server.reply(500, b"oops")
    server.reply(200, board(9_999), delay=2.0)  # slower than the poller's timeout
    server.reply(200, board(2_000))

    def step():
        result = poller.poll_once()
        h = poller.health
        clock.sleep(h["next_delay_s"])
        return result, h

    (trades, bad, info), h = step()  # baseline
    assert len(trades) == 0 and info["baseline"] == 25 and h["state"] == LIVE
    (trades, _, _), h = step()
    assert trades.size.tolist() == [600] and trades.time.tolist() == [TUE_1000 + NS]
    assert h["state"] == LIVE and clock.sleeps[-1] == pytest.approx(1.0)

    t_before = clock.t
    result, h = step()  # 429 Retry-After: 2
    assert result is None and h["state"] == BACKOFF and h["rate_limited"] == 1
    assert clock.t - t_before >= 2.0 and "429" in h["last_error"]

    bounds, waits = [], []
    for _ in range(5):  # 500s: full jitter under a growing, capped ceiling
        result, h = step()
        assert result is None and h["state"] == BACKOFF and h["last_error"] == "HTTP 500"
        bounds.append(h["backoff_bound_s"])
        waits.append(h["next_delay_s"])
    # The 429 was the first failure in the run, so the 500s are failures 2..6.
    assert bounds == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0.0 <= w <= b for w, b in zip(waits, bounds))
    assert len(set(waits)) == len(waits)  # jittered, not a fixed schedule

    result, h = step()  # times out
    assert result is None and h["state"] == BACKOFF and h["last_error"].startswith("timeout")
    assert h["consecutive_errors"] == 7 and h["backoff_bound_s"] == 4.0

    (trades, bad, _), h = step()  # recovered
    assert h["state"] == LIVE and h["consecutive_errors"] == 0 and h["errors"] == 7
    assert h["polls"] == 10 and len(bad) == 0
    assert trades.size.tolist() == [400]  # 2,000 - 1,600: the timed-out board never counted
    assert all(s["User-Agent"].startswith("tapeflow") for s in server.seen)


def test_poller_run_loop_keeps_cadence_and_goes_stale(server):
    clock = FakeClock()
    for v in (1_000, 1_100, 1_300):
        server.reply(200, board(v))
    got = []
    poller = make_poller(server.url, clock, PsxBoard(SymbolTable()).parse)
    poller.run(got.append, max_polls=3)
    assert [len(t) for t, _, _ in got] == [0, 1, 1]
    assert [t.size.tolist() for t, _, _ in got[1:]] == [[100], [200]]
    assert clock.sleeps == [1.0, 1.0]
    assert poller.health["state"] == LIVE
    clock.sleep(3.5)  # no good poll for more than three intervals
    assert poller.health["state"] == STALE


def test_poller_retry_after_http_date(server):
    clock = FakeClock()
    server.reply(429, headers={"Retry-After": "Tue, 20 Apr 2021 05:00:30 GMT",
                               "Date": "Tue, 20 Apr 2021 05:00:00 GMT"})
    poller = make_poller(server.url, clock, lambda body, ns: body)
    assert poller.poll_once() is None
    assert poller.health["next_delay_s"] == 30.0


def test_poller_client_errors_are_fatal(server):
    clock = FakeClock()
    server.reply(404, b"no such page")
    server.reply(200, board(1))
    got = []
    poller = make_poller(server.url, clock, lambda body, ns: body)
    poller.run(got.append)
    h = poller.health
    assert h["state"] == FAILED and h["last_error"].startswith("HTTP 404") and got == []
    assert len(server.replies) == 1  # gave up without asking again


def test_poller_connection_refused_backs_off_then_gives_up():
    clock = FakeClock()
    poller = make_poller(f"http://127.0.0.1:{free_port()}/board", clock,
                         lambda body, ns: body, max_failures=3, timeout_s=1.0)
    poller.run(lambda r: None)
    h = poller.health
    assert h["state"] == FAILED and h["errors"] == 3
    assert h["last_error"].startswith("connection error")
    assert len(clock.sleeps) == 2 and clock.sleeps[0] <= 0.5 and clock.sleeps[1] <= 1.0


def test_poller_stop_interrupts_the_default_sleep():
    replies = iter([Response(200, body=b"x")] * 100)
    poller = HttpPoller("http://example.invalid/", lambda body, ns: body, interval_s=30,
                        fetch=lambda url, timeout, headers: next(replies))
    got = []
    thread = threading.Thread(target=poller.run, args=(got.append,))
    thread.start()
    while not got:
        threading.Event().wait(0.01)
    poller.stop()
    thread.join(2)
    assert not thread.is_alive() and got == [b"x"]


def test_poller_rejects_bad_settings():
    with pytest.raises(ValueError):
        HttpPoller("http://127.0.0.1/", lambda b, n: b, interval_s=0)
    with pytest.raises(ValueError):
        HttpPoller("http://127.0.0.1/", lambda b, n: b, backoff_base_s=5, backoff_cap_s=1)

