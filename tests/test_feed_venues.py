"""Coinbase, Polygon and PSX feeds on loopback servers, pushing into a real Flow.

Coinbase replays its real capture frame by frame; Polygon is a small server speaking the
documented protocol (status, auth, subscribe, T/AM events); PSX is an HTTP server serving
successive boards. Every test checks that what the venue sent reaches the flow exactly once:
the flow's counters reconcile and duplicates equal the feed's overlap.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketHandler

from flows.feeds import FeedError
from flows.feeds.binance import BinanceFeed
from flows.feeds.coinbase import CoinbaseFeed, CoinbaseParser, start_coinbase
from flows.feeds.coinbase import capture_frames as coinbase_capture
from flows.feeds.connection import ConnectionConfig
from flows.feeds.polygon import PolygonFeed, start_polygon
from flows.feeds.psx import PsxFeed, start_psx
from flows.pipeline import Flow, FlowConfig
from flows.schema import SymbolTable, TradeBatch
from tests.wsserver import Session, WsServer, capture_frames

DATA = Path(__file__).parent / "data"
COINBASE = DATA / "coinbase_pro_ws_matches_ticker_2021-04-17.jsonl"
# A held connection stays quiet after the last frame: the idle timeout must outlast a slow
# drain (the first push through the analytics is slow on a loaded machine), or the feed
# reconnects and the replay shows up as duplicates.
FAST = ConnectionConfig(idle_s=60.0, backoff_base_s=0.01, backoff_cap_s=0.05, healthy_after_s=0.2)
MATCHES = ('"type":"match"', '"type":"last_match"')

pytestmark = pytest.mark.timeout(60)


def make_flow(**kw) -> Flow:
    kw.setdefault("analytics", False)
    return Flow(FlowConfig(store=None, timeframes=("1m",), **kw))


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def stop_after(feed, predicate) -> None:
    """Wait for ``predicate``, let the queued frames reach the flow, then stop the feed."""
    try:
        wait_until(lambda: predicate() or feed.failure is not None)
        assert feed.failure is None, feed.failure
        if hasattr(feed, "drain"):
            assert feed.drain()
    finally:
        feed.stop()


# --------------------------------------------------------------------------- Coinbase

FRAMES = capture_frames(COINBASE)
PRODUCTS = json.loads(FRAMES[0])["channels"][0]["product_ids"]


def is_match(frame: str) -> bool:
    return any(m in frame for m in MATCHES)


def capture_trades(table: SymbolTable) -> TradeBatch:
    """The oracle: CoinbaseParser straight over the capture file."""
    parser = CoinbaseParser(table)
    return TradeBatch.concat([parser.parse(f, ns)[0] for f, ns in coinbase_capture(COINBASE)])


def test_coinbase_feed_pushes_exactly_the_captured_matches():
    flow = make_flow(analytics=True)
    accepted = []
    flow.taps["accepted"].sink(accepted.append)
    with WsServer(FRAMES) as server:
        feed = start_coinbase(flow, PRODUCTS, url=server.url, config=FAST)
        assert flow.feeds["coinbase"] == feed.health
        stop_after(feed, lambda: feed.health().frames == len(FRAMES))
        sent = [json.loads(m) for m in server.connections[0].received]

    table = SymbolTable()
    want, got = capture_trades(table), TradeBatch.concat(accepted)
    assert len(got) == len(want) == sum(map(is_match, FRAMES)) == 107
    assert [flow.table.names[c] for c in got.symbol] == [table.names[c] for c in want.symbol]
    for col in ("time", "price", "size", "trade_id", "side", "count"):
        np.testing.assert_array_equal(getattr(got, col), getattr(want, col))
    c = flow.counters
    assert (c.received, c.accepted, c.duplicates, c.quarantined_total) == (107, 107, 0, 0)
    h = feed.health()
    assert h.trades == 107 and h.ignored == {"ticker": 107, "subscriptions": 3}
    assert h.gaps == h.overlap == h.reconnects == 0 and h.events == {}
    assert sent == [{"type": "subscribe", "product_ids": PRODUCTS,
                     "channels": ["matches", "heartbeat"]}]
    assert flow.analytics.quality.feeds == ["coinbase"]  # pushed under the feed's name
    assert flow.feed_state == "STOPPED" and feed.tracker.states() == ["CONNECTING", "LIVE", "STOPPED"]


def test_coinbase_reconnect_with_overlapping_frames_loses_and_doubles_nothing():
    cut, back = 150, 100
    sessions = [Session(stop=cut, then="close", close_code=1001, close_reason="going away"),
                Session(start=back)]
    flow = make_flow()
    with WsServer(FRAMES, sessions) as server:
        feed = start_coinbase(flow, PRODUCTS, url=server.url, config=FAST)
        stop_after(feed, lambda: feed.health().frames == len(FRAMES) + cut - back)
        sent = [[json.loads(m) for m in conn.received] for conn in server.connections]

    overlap = sum(map(is_match, FRAMES[back:cut]))
    h = feed.health()
    assert overlap > 10 and h.overlap == overlap and h.reconnects == 1 and h.gaps == 0
    assert "out_of_order" not in h.events  # replayed matches are overlap, not reordering
    c = flow.counters
    assert c.duplicates == overlap and c.accepted == 107 and c.reconciles()
    assert len(sent) == 2 and sent[0] == sent[1] and sent[1][0]["type"] == "subscribe"
    assert "1001" in h.last_error and "going away" in h.last_error


def test_coinbase_matches_missed_while_away_are_gap_events():
    sessions = [Session(stop=100, then="close"), Session(start=140)]
    flow = make_flow()
    with WsServer(FRAMES, sessions) as server:
        feed = start_coinbase(flow, PRODUCTS, url=server.url, config=FAST)
        stop_after(feed, lambda: feed.health().frames == len(FRAMES) - 40)

    missed = [json.loads(f) for f in FRAMES[100:140] if is_match(f)]
    later = {json.loads(f)["product_id"] for f in FRAMES[140:] if is_match(f)}
    h = feed.health()
    assert h.gaps == len({m["product_id"] for m in missed} & later) > 0
    assert h.missing_ids == sum(m["product_id"] in later for m in missed)
    assert h.events["trade_id_gap"] == h.gaps
    assert flow.counters.accepted == 107 - len(missed) and flow.counters.reconciles()


def test_coinbase_subscribe_on_the_live_connection_normalizes_product_ids():
    with WsServer(FRAMES, [Session(stop=10)]) as server:
        feed = CoinbaseFeed(SymbolTable(), PRODUCTS[:1], lambda b, q: None, url=server.url,
                            config=FAST).start()
        try:
            wait_until(lambda: feed.health().frames == 10)
            feed.subscribe(["eth-usd"])
            feed.unsubscribe([PRODUCTS[0]])
            wait_until(lambda: len(server.connections[0].received) == 3)
        finally:
            feed.stop()
    sent = [json.loads(m) for m in server.connections[0].received]
    assert [(m["type"], m["product_ids"]) for m in sent] == [
        ("subscribe", PRODUCTS[:1]), ("subscribe", ["ETH-USD"]), ("unsubscribe", PRODUCTS[:1])]
    assert feed.subscriptions == ["ETH-USD"]


def test_coinbase_error_frame_fails_the_feed_without_retrying():
    error = json.dumps({"type": "error", "message": "Failed to subscribe",
                        "reason": "FOO-BAR is not a valid product"})
    with WsServer([], [Session(inject={0: [error]})]) as server:
        feed = start_coinbase(make_flow(), ["FOO-BAR"], url=server.url, config=FAST)
        assert feed.wait_for_state("FAILED", timeout=10)
        feed.join(5)
        assert len(server.connections) == 1 and not feed.is_alive()
    assert feed.failure == ("coinbase refused the request: Failed to subscribe: FOO-BAR is not "
                            "a valid product; not retrying")
    with pytest.raises(FeedError, match="bad product id"):
        start_coinbase(make_flow(), ["BTCUSD"])


# --------------------------------------------------------------------------- Polygon

KEY = "test-key-123"
M0 = 1610144640000  # 2021-01-08 22:24 UTC, ms
T_EVENTS = [
    [{"ev": "T", "sym": "AAPL", "x": 4, "i": "1", "p": 130.0, "s": 100, "t": M0 + 1000, "q": 10},
     {"ev": "T", "sym": "MSFT", "x": 4, "i": "2", "p": 210.0, "s": 10, "t": M0 + 1500, "q": 7},
     {"ev": "T", "sym": "AAPL", "x": 11, "i": "1", "p": 131.0, "s": 50, "t": M0 + 2000, "q": 13}],
    [{"ev": "T", "sym": "MSFT", "x": 4, "i": "3", "p": 211.0, "s": 20, "t": M0 + 61000, "q": 9}],
]
AM = {"ev": "AM", "v": 150, "av": 9000, "op": 129.0, "z": 75, "s": M0, "e": M0 + 60000}
AM_EVENTS = [[dict(AM, sym="AAPL", o=130.0, h=131.0, l=130.0, c=131.0, vw=130.33),  # we have it
              dict(AM, sym="GTE", o=0.4488, h=0.4489, l=0.4486, c=0.4486, v=4110, vw=0.4488)]]


class _PolygonHandler(WebSocketHandler):
    """Polygon's handshake: ``connected``, then auth, then subscribe, then the data frames."""

    def initialize(self, server: PolygonServer) -> None:
        self.server = server
        self.authed = False

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self) -> None:
        self.received: list[dict] = []
        with self.server.lock:
            self.server.connections.append(self.received)
        self.write_message(json.dumps([{"ev": "status", "status": "connected",
                                        "message": "Connected Successfully"}]))

    async def on_message(self, message: str) -> None:
        msg = json.loads(message)
        self.received.append(msg)
        if msg.get("action") == "auth":
            self.authed = msg.get("params") == self.server.key
            status = ("auth_success", "authenticated") if self.authed else \
                ("auth_failed", "authentication failed")
            await self.write_message(json.dumps([{"ev": "status", "status": status[0],
                                                  "message": status[1]}]))
        elif msg.get("action") == "subscribe":
            if not self.authed:
                self.server.violations.append("subscribe before auth_success")
                return
            await self.write_message(json.dumps([{"ev": "status", "status": "success",
                                                  "message": f"subscribed to: {msg['params']}"}]))
            for frame in self.server.frames:
                await self.write_message(json.dumps(frame))


class PolygonServer:
    """A loopback Polygon-style websocket server in its own thread."""

    def __init__(self, frames: list, key: str = KEY):
        self.frames, self.key = frames, key
        self.connections: list[list[dict]] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()
        sockets = bind_sockets(0, "127.0.0.1")
        self.url = f"ws://127.0.0.1:{sockets[0].getsockname()[1]}/stocks"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(sockets),),
                                        daemon=True)

    async def _main(self, sockets) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = HTTPServer(tornado.web.Application([(r"/stocks", _PolygonHandler,
                                                      {"server": self})]))
        server.add_sockets(sockets)
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await server.close_all_connections()

    def __enter__(self) -> PolygonServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def test_polygon_trades_and_minute_bars_reach_the_flow(monkeypatch):
    monkeypatch.setenv("POLYGON_API_KEY", KEY)
    flow = make_flow()
    with PolygonServer(T_EVENTS + AM_EVENTS) as server:
        feed = start_polygon(flow, ["aapl", "MSFT", "GTE"], url=server.url, bars=True, config=FAST)
        # connected, auth_success, subscribed, then the data frames
        stop_after(feed, lambda: feed.health().frames == 3 + len(T_EVENTS) + len(AM_EVENTS))
        received = server.connections[0]

    assert received == [{"action": "auth", "params": KEY},
                        {"action": "subscribe",
                         "params": "T.AAPL,T.MSFT,T.GTE,AM.AAPL,AM.MSFT,AM.GTE"}]
    assert server.violations == []
    c = flow.counters
    assert (c.received, c.accepted, c.duplicates) == (4 + 1, 4 + 1, 0) and c.reconciles()
    aapl = flow.bars("1m", "AAPL")  # from our trades only: its AM bar would count them twice
    assert aapl[["open", "close", "volume", "trades"]].values.tolist() == [[130.0, 131.0, 150, 2]]
    assert flow.bars("1m", "MSFT")["volume"].tolist() == [10, 20]
    gte = flow.bars("1m", "GTE")  # no trade of ours that minute: Polygon's bar fills it
    assert gte.index.tolist() == [pd.Timestamp(M0, unit="ms")]
    assert gte[["open", "high", "low", "close", "volume"]].values.tolist() == \
        [[0.4488, 0.4489, 0.4486, 0.4486, 4110]]
    h = feed.health()
    assert h.trades == 4 and h.gaps == 0 and h.events == {}  # q skips numbers: no gaps
    assert h.ignored == {"status": 3, "AM_minute_had_trades": 1}
    assert (feed.bars_received, feed.bars_pushed, feed.bars_covered) == (2, 1, 1)
    assert flow.feeds["polygon"] == feed.health and flow.feed_state == "STOPPED"


def test_polygon_bad_key_fails_once_with_the_reason():
    config = ConnectionConfig(backoff_base_s=0.01, backoff_cap_s=0.01, max_failures=50)
    flow = make_flow()
    with PolygonServer(T_EVENTS) as server:
        feed = start_polygon(flow, ["*"], url=server.url, key="wrong", config=config)
        assert feed.wait_for_state("FAILED", timeout=10)
        feed.join(5)
        assert not feed.is_alive() and len(server.connections) == 1
        assert server.connections[0] == [{"action": "auth", "params": "wrong"}]
    assert feed.failure == "polygon: auth_failed: authentication failed; not retrying"
    assert feed.health().last_error == feed.failure and flow.feed_state == "FAILED"
    assert flow.counters.received == 0


def test_polygon_without_a_key_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("POLYGON_API_KEY", raising=False)
    flow = make_flow()
    with pytest.raises(FeedError, match="^polygon: no API key; pass one or set POLYGON_API_KEY$"):
        start_polygon(flow, ["AAPL"])
    with pytest.raises(FeedError, match="not both"):
        start_polygon(flow, ["*", "AAPL"], key=KEY)
    assert flow.feeds == {}


# --------------------------------------------------------------------------- PSX

BOARD = json.loads((DATA / "psx_board_sample.json").read_text())["data"]
HBL = next(r for r in BOARD if r["symbol"] == "HBL")
TUE_1000 = int(pd.Timestamp("2021-04-20 10:00", tz="Asia/Karachi").value)


def board(hbl_volume: int) -> bytes:
    return json.dumps([dict(r, volume=hbl_volume) if r is HBL else r for r in BOARD]).encode()


class _Script(tornado.web.RequestHandler):
    def initialize(self, server: BoardServer) -> None:
        self.server = server

    def get(self) -> None:
        s = self.server
        s.seen.append(time.monotonic())
        status, headers, body = s.replies.popleft() if len(s.replies) > 1 else s.replies[0]
        self.set_status(status)
        for k, v in headers.items():
            self.set_header(k, v)
        self.finish(body)


class BoardServer:
    """Serve scripted replies on ``/board``, the last one for ever; note each request's time."""

    def __init__(self, *replies: tuple[int, dict, bytes]):
        self.replies, self.seen = deque(replies), []
        sockets = bind_sockets(0, "127.0.0.1")
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/board"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(sockets),),
                                        daemon=True)

    async def _main(self, sockets) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = HTTPServer(tornado.web.Application([(r"/board", _Script, {"server": self})]))
        server.add_sockets(sockets)
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


def karachi_clock():
    """Wall-clock ns running from Tuesday 2021-04-20 10:00 in Karachi (in session)."""
    t0 = time.monotonic_ns()
    return lambda: TUE_1000 + time.monotonic_ns() - t0


def test_psx_board_changes_become_trades_and_a_429_is_waited_out():
    replies = [(200, {}, board(1_000)), (200, {}, board(1_600)),
               (429, {"Retry-After": "1"}, b"slow down"), (200, {}, board(2_000))]
    flow = make_flow()
    with BoardServer(*replies) as server:
        feed = start_psx(flow, url=server.url, interval_s=0.05,
                         sectors=DATA / "psx_sector_codes_2021.csv", wall_ns=karachi_clock())
        assert isinstance(feed, PsxFeed) and flow.feeds["psx"] == feed.health
        stop_after(feed, lambda: flow.counters.received == 2 and len(server.seen) >= 5)
        seen = list(server.seen)

    assert seen[3] - seen[2] >= 1.0  # Retry-After: 1, although the interval is 0.05 s
    assert all(b - a < 0.9 for a, b in itertools.pairwise(seen[3:]))  # then the cadence again
    c = flow.counters
    assert (c.received, c.accepted) == (2, 2) and c.reconciles()
    hbl = flow.bars("1m", "HBL")  # 1,600 - 1,000, then 2,000 - 1,600, at the board's price
    assert hbl[["close", "volume", "trades"]].values.tolist() == [[HBL["current"], 1_000, 2]]
    assert flow.meta("HBL")["sector"] == "COMMERCIAL BANKS"
    h = feed.health()
    assert h.trades == 2 and h.events == {"rate_limited": 1} and h.reconnects == 1
    assert "429" in h.last_error and h.state == "STOPPED" and flow.feed_state == "STOPPED"
    assert feed.tracker.states()[:4] == ["CONNECTING", "LIVE", "BACKOFF", "LIVE"]
    assert flow.status()["health"]["feed"] == "psx"


def test_psx_stop_ends_the_poll_thread_promptly():
    with BoardServer((200, {}, board(1_000))) as server:
        feed = start_psx(make_flow(), url=server.url, interval_s=30.0, wall_ns=karachi_clock())
        wait_until(lambda: feed.health().frames == 1)
        t0 = time.monotonic()
        feed.stop()
        assert time.monotonic() - t0 < 1.0 and not feed.is_alive()
    assert feed.health().state == "STOPPED" and feed.failure is None and len(server.seen) == 1


def test_psx_client_error_fails_the_feed_after_one_request():
    flow = make_flow()
    with BoardServer((404, {}, b"no such page")) as server:
        feed = start_psx(flow, url=server.url, interval_s=0.05)
        assert feed.wait_for_state("FAILED", timeout=10)
        feed.join(5)
        assert len(server.seen) == 1 and not feed.is_alive()
    assert feed.failure == f"HTTP 404 from {server.url}" and flow.feed_state == "FAILED"
    with pytest.raises(FeedError, match="^psx: cannot read sector codes from /nowhere.csv: "):
        start_psx(make_flow(), url=server.url, sectors="/nowhere.csv")


# --------------------------------------------------------------------------- one surface

@pytest.mark.parametrize("make", [
    lambda: BinanceFeed(SymbolTable(), ["btcusdt@aggTrade"], lambda b, q: None),
    lambda: CoinbaseFeed(SymbolTable(), ["BTC-USD"], lambda b, q: None),
    lambda: PolygonFeed(SymbolTable(), ["T.AAPL"], lambda b, q: None, key=KEY),
    lambda: PsxFeed(SymbolTable(), lambda b, q: None),
], ids=["binance", "coinbase", "polygon", "psx"])
def test_every_venue_feed_has_the_same_surface(make):
    feed = make()
    assert feed.failure is None and not feed.is_alive()
    h = feed.health()
    assert h.state == "CONNECTING" and h.feed == feed.name and h.reconnects == h.gaps == 0
    assert callable(feed.start) and callable(feed.stop) and callable(feed.join)
    feed.stop()  # stopping a feed that never started is harmless
    assert not feed.is_alive()
