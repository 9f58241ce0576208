"""The shared websocket machinery: backoff, circuit breaker, health, and faults on loopback."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from flows.feeds.binance import BinanceFeed
from flows.feeds.connection import Backoff, CircuitBreaker, ConnectionConfig
from flows.feeds.health import HealthTracker
from flows.schema import NS, SymbolTable, TradeBatch
from tests.conftest import free_port
from tests.wsserver import Session, WsServer, capture_frames

DATA = Path(__file__).parent / "data"
SPOT = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"

pytestmark = pytest.mark.timeout(60)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def feed_for(server_url: str, sink=None, config: ConnectionConfig | None = None, **kw) -> BinanceFeed:
    return BinanceFeed(SymbolTable(), ["ftmusdt@aggTrade"], sink or (lambda b, q: None),
                       url=server_url, config=config, **kw)


# --------------------------------------------------------------------------- units

def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling():
    b = Backoff(0.1, 1.0, random.Random(7))
    ref = random.Random(7)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    delays = [b.next_delay() for _ in ceilings]
    assert delays == [ref.uniform(0, c) for c in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    b.reset()
    assert b.ceiling() == 0.1
    many = Backoff(1.0, 8.0, random.Random(1))
    draws = [many.next_delay() for _ in range(2000)][5:]  # all under the cap of 8
    assert max(draws) <= 8.0 and sum(draws) / len(draws) == pytest.approx(4.0, rel=0.1)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_circuit_breaker_counts_failures_inside_its_window():
    now = [0.0]
    cb = CircuitBreaker(3, 10.0, clock=lambda: now[0])
    assert not cb.record_failure() and not cb.record_failure()
    now[0] = 10.5
    assert not cb.record_failure() and cb.failures == 1
    cb.reset()
    assert [cb.record_failure() for _ in range(3)] == [False, False, True]


def test_health_tracker_lag_rates_overlap_and_states():
    now = [100.0]
    seen = []
    h = HealthTracker("t", clock=lambda: now[0], rate_window_s=10.0, on_state=seen.append)
    table = SymbolTable()
    batch = TradeBatch.from_columns(table, time=[NS, NS, NS], symbol=["A", "A", "B"],
                                    price=[1.0] * 3, size=[1.0] * 3, trade_id=[5, 6, 9])
    for _ in range(20):
        h.frame()
    h.observe(batch, recv_ns=NS + 3_000_000)
    h.observe(batch, recv_ns=NS + 3_000_000)  # the same ids again: overlap, not gaps
    h.set_state("LIVE")
    h.set_state("STALE", "no frame for 1 s")
    now[0] += 5.0
    s = h.snapshot()
    assert (s.frames, s.trades, s.overlap, s.gaps) == (20, 6, 3, 0)
    assert s.messages_per_s == 2.0 and s.trades_per_s == 0.6
    assert s.lag_ms_p50 == s.lag_ms_p99 == 3.0
    assert s.state == "STALE" and s.state_for_s == 5.0 and s.last_error == "no frame for 1 s"
    assert seen == ["LIVE", "STALE"] and h.states() == ["CONNECTING", "LIVE", "STALE"]
    now[0] += 20.0
    assert h.snapshot().messages_per_s == 0.0
    assert s.to_dict()["ignored"] == {}
    with pytest.raises(ValueError):
        h.set_state("SLEEPY")


def test_config_is_validated():
    with pytest.raises(ValueError):
        ConnectionConfig(idle_s=0)
    with pytest.raises(ValueError):
        ConnectionConfig(max_frame_bytes=10, hard_max_frame_bytes=5)


# --------------------------------------------------------------------------- on loopback

def test_flapping_server_backoff_grows_within_jitter_and_resets_after_a_healthy_period():
    frames = capture_frames(SPOT)

    def session(i: int) -> Session:
        if i == 5:  # one healthy connection: frames for ~0.5 s, longer than healthy_after_s
            return Session(stop=50, interval_s=0.01, then="close")
        return Session(stop=1, then="close")  # accept, one frame, hang up

    base, cap = 0.02, 0.1
    config = ConnectionConfig(idle_s=5, backoff_base_s=base, backoff_cap_s=cap,
                              healthy_after_s=0.3, max_failures=50)
    with WsServer(frames, session) as server:
        feed = feed_for(server.url, config=config, rng=random.Random(3)).start()
        try:
            wait_until(lambda: len(feed.tracker.backoffs) >= 9)
        finally:
            feed.stop()
    backoffs = list(feed.tracker.backoffs)[:9]
    ceilings = [c for _, c in backoffs]
    # Five flaps: the ceiling doubles up to the cap; after the healthy connection it is back
    # at base, and grows again.
    assert ceilings == [0.02, 0.04, 0.08, 0.1, 0.1, 0.02, 0.04, 0.08, 0.1]
    ref = random.Random(3)
    assert [d for d, _ in backoffs] == [ref.uniform(0, c) for c in ceilings]
    assert all(0 <= d <= c for d, c in backoffs)
    assert feed.failure is None and feed.health().reconnects >= 8


def test_bad_auth_close_code_fails_the_feed_with_a_reason_and_no_retry():
    frames = capture_frames(SPOT)
    config = ConnectionConfig(backoff_base_s=0.01, backoff_cap_s=0.01)
    with WsServer(frames, [Session(refuse_code=1008, close_reason="invalid api key")]) as server:
        feed = feed_for(server.url, config=config).start()
        assert feed.wait_for_state("FAILED", timeout=5)
        feed.join(5)
        time.sleep(0.2)
        connections = len(server.connections)
    assert connections == 1 and not feed.is_alive()
    assert "1008" in feed.failure and "invalid api key" in feed.failure
    assert feed.health().state == "FAILED" and feed.health().last_error == feed.failure


def test_refused_handshake_fails_the_feed_without_retrying():
    with WsServer([], [Session(refuse_status=401)]) as server:
        feed = feed_for(server.url).start()
        assert feed.wait_for_state("FAILED", timeout=5)
        feed.join(5)
        assert len(server.connections) == 1
    assert "HTTP 401" in feed.failure


def test_unreachable_feed_trips_the_circuit_breaker():
    url = f"ws://127.0.0.1:{free_port()}"
    config = ConnectionConfig(backoff_base_s=0.01, backoff_cap_s=0.02, max_failures=4,
                              connect_timeout_s=1)
    feed = feed_for(url, config=config).start()
    assert feed.wait_for_state("FAILED", timeout=10)
    feed.join(5)
    assert feed.failure.startswith("4 failed connections within 300 s; last: connect failed")
    assert len(feed.tracker.backoffs) == 3


def test_a_slow_sink_gets_whole_frames_dropped_and_counted():
    frames = capture_frames(SPOT)
    gate = threading.Event()
    got = []

    def sink(batch, unparsed):
        gate.wait(10)
        got.append(len(batch))

    config = ConnectionConfig(queue_frames=3, idle_s=5)
    with WsServer(frames) as server:
        feed = feed_for(server.url, sink=sink, config=config).start()
        try:
            wait_until(lambda: feed.health().frames == len(frames))
            gate.set()
            assert feed.drain()
        finally:
            feed.stop()
    h = feed.health()
    total = sum("@aggTrade" in f for f in frames)
    assert h.dropped_trades > 0 and h.dropped_frames > 0
    assert sum(got) + h.dropped_trades == total == h.trades


def test_a_raising_sink_is_counted_and_the_feed_carries_on():
    frames = capture_frames(SPOT)
    calls = []

    def sink(batch, unparsed):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("disk full")

    with WsServer(frames, [Session(interval_s=0.0005)]) as server:
        feed = feed_for(server.url, sink=sink, config=ConnectionConfig(idle_s=5)).start()
        try:
            wait_until(lambda: feed.health().frames == len(frames))
            assert feed.drain()
        finally:
            feed.stop()
    h = feed.health()
    assert h.dropped_trades == calls[0] and sum(calls) == h.trades
    assert "disk full" in h.last_error and h.state == "STOPPED"


def test_session_rollover_reconnects_on_our_schedule_without_counting_a_failure():
    frames = capture_frames(SPOT)
    config = ConnectionConfig(idle_s=5, backoff_base_s=0.01, max_session_s=0.3, max_failures=1)
    with WsServer(frames, [Session(stop=10, then="hold"), Session(start=10)]) as server:
        feed = feed_for(server.url, config=config).start()
        try:
            wait_until(lambda: feed.health().frames == len(frames))
        finally:
            feed.stop()
    assert feed.failure is None and feed.health().reconnects == 1
    assert "session rollover" in feed.health().last_error


def test_stop_while_connecting_and_while_backing_off_is_prompt():
    url = f"ws://127.0.0.1:{free_port()}"
    feed = feed_for(url, config=ConnectionConfig(backoff_base_s=30, backoff_cap_s=30)).start()
    assert feed.wait_for_state("BACKOFF", timeout=5)
    t0 = time.monotonic()
    feed.stop()
    assert time.monotonic() - t0 < 2 and not feed.is_alive()
    assert feed.health().state == "STOPPED"
