"""The Binance feed against a loopback websocket server replaying real captures.

Every test asserts that nothing is lost or double-counted: the flow's counters reconcile
(received = accepted + quarantined + duplicates) and the bars equal those of ``tapeflow replay``
of the same capture (:func:`flows.runner.replay_files`, the code behind the command).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.feeds import FeedError
from flows.feeds.binance import (
    BinanceFeed,
    flow_bar_lookup,
    start_binance,
    stream_names,
)
from flows.feeds.connection import ConnectionConfig
from flows.feeds.replay import read_binance_capture
from flows.pipeline import Flow, FlowConfig
from flows.runner import replay_files
from flows.schema import SymbolTable, TradeBatch
from tests.oracle import assert_bars_equal, dataset_to_frame
from tests.wsserver import Session, WsServer, capture_frames

DATA = Path(__file__).parent / "data"
CAPTURES = sorted(DATA.glob("binance*_ws_combined_*.jsonl"))
SPOT = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"
USDM = DATA / "binance_usdm_ws_combined_2021-04-17T1637Z.jsonl"
FAST = ConnectionConfig(idle_s=5.0, backoff_base_s=0.01, backoff_cap_s=0.05, healthy_after_s=0.2)

pytestmark = pytest.mark.timeout(60)


def make_flow() -> Flow:
    return Flow(FlowConfig(store=None, timeframes=("1m", "5m"), analytics=False))


def assert_same_bars(flow: Flow, path: Path) -> None:
    """Bars of ``flow`` equal those of a replay of ``path``: keys, OHLC and trade counts
    exactly, volume and vwap to float64 summation rounding (sums depend on batch boundaries)."""
    replayed = make_flow()
    replay_files(replayed, [str(path)])
    for tf in ("1m", "5m"):
        got, want = flow.engine.dataset(tf), replayed.engine.dataset(tf)
        assert got.symbol.values.tolist() == want.symbol.values.tolist()
        assert_bars_equal(dataset_to_frame(got), dataset_to_frame(want))


def agg_frames(frames: list[str], lo: int = 0, hi: int | None = None) -> int:
    return sum("@aggTrade" in f for f in frames[lo:hi])


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def run(server: WsServer, flow: Flow, frames_expected: int, streams=("ftmusdt@aggTrade",),
        config: ConnectionConfig = FAST, **kwargs) -> BinanceFeed:
    """Run a feed into ``flow`` until it has read ``frames_expected`` frames, then stop it."""
    feed = BinanceFeed(flow.table, list(streams), flow.push, url=server.url, config=config,
                       **kwargs).start()
    try:
        wait_until(lambda: feed.health().frames >= frames_expected or feed.failure is not None)
        assert feed.drain()
    finally:
        feed.stop()
    assert feed.health().frames == frames_expected
    return feed


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name[:24])
def test_feed_trades_are_the_capture_aggtrades_and_bars_equal_replay(path):
    frames = capture_frames(path)
    cap = read_binance_capture(path, SymbolTable())
    flow = make_flow()
    got = []

    def sink(batch, unparsed):
        got.append(batch)
        flow.push(batch, unparsed)

    with WsServer(frames) as server:
        feed = BinanceFeed(flow.table, ["ftmusdt@aggTrade"], sink, url=server.url, config=FAST).start()
        wait_until(lambda: feed.health().frames == len(frames))
        assert feed.drain()
        health = feed.health()
        feed.stop()

    ours, theirs = flow.table, cap.trades
    trades = TradeBatch.concat(got)
    assert [ours.names[c] for c in trades.symbol] == cap.agg.symbol.tolist()
    for col in ("time", "price", "size", "trade_id", "side", "count"):
        np.testing.assert_array_equal(getattr(trades, col), getattr(theirs, col))
    c = flow.counters
    assert c.received == c.accepted == len(cap.agg) and c.reconciles()
    assert c.duplicates == 0 and c.quarantined_total == 0
    assert_same_bars(flow, path)
    assert health.trades == len(cap.agg) and health.frames == len(frames)
    assert health.ignored == {k: v for k, v in cap.ignored.items() if not k.startswith("kline")}
    assert health.gaps == health.overlap == health.reconnects == 0
    assert health.lag_ms_p50 is not None and health.lag_ms_p50 <= health.lag_ms_p99
    assert feed.klines() and all(k["interval"] == "1m" for k in feed.klines().values())
    assert feed.tracker.states() == ["CONNECTING", "LIVE", "STOPPED"]


def test_close_mid_stream_and_overlapping_replay_gives_the_same_bars():
    frames = capture_frames(USDM)
    cut, back = 2000, 1500
    sessions = [Session(stop=cut, then="close", close_code=1001, close_reason="going away"),
                Session(start=back)]
    flow = make_flow()
    with WsServer(frames, sessions) as server:
        feed = run(server, flow, len(frames) + cut - back)
        uris = [c.uri for c in server.connections]

    overlap = agg_frames(frames, back, cut)
    h = feed.health()
    assert overlap > 10 and h.overlap == overlap and h.reconnects == 1 and h.gaps == 0
    assert flow.counters.duplicates == overlap and flow.counters.reconciles()
    assert flow.counters.accepted == agg_frames(frames)
    assert_same_bars(flow, USDM)
    assert uris[0] == uris[1] == "/stream?streams=ftmusdt@aggTrade"  # same subscriptions
    assert "1001" in h.last_error and "going away" in h.last_error


def test_frames_missed_while_disconnected_are_recorded_as_gaps():
    frames = capture_frames(USDM)
    sessions = [Session(stop=1000, then="close"), Session(start=1400)]
    flow = make_flow()
    with WsServer(frames, sessions) as server:
        feed = run(server, flow, len(frames) - 400)
    missed = [json.loads(f)["data"] for f in frames[1000:1400] if "@aggTrade" in f]
    h = feed.health()
    later = {json.loads(f)["data"]["s"] for f in frames[1400:] if "@aggTrade" in f}
    assert h.gaps == len({d["s"] for d in missed} & later) > 0
    assert h.missing_ids == sum(1 for d in missed if d["s"] in later)
    assert h.events["trade_id_gap"] == h.gaps
    assert flow.counters.accepted == agg_frames(frames) - len(missed) and flow.counters.reconciles()


def test_malformed_frames_are_quarantined_with_raw_payload_and_the_stream_continues():
    frames = capture_frames(SPOT)
    agg = [f for f in frames if "@aggTrade" in f]
    data = json.loads(agg[0])["data"]
    garbage = [
        "{not json",
        agg[1][: len(agg[1]) // 2],                                   # truncated
        "[1, 2, 3]",
        b"\xff\xfe binary garbage",
        json.dumps({"stream": "ftmusdt@aggTrade", "data": {**data, "p": ["1"]}}),     # wrong type
        json.dumps({"stream": "ftmusdt@aggTrade", "data": {**data, "a": 10**30}}),    # huge id
        json.dumps({"stream": "ftmusdt@aggTrade", "data": {**data, "T": "soon"}}),
        json.dumps({"stream": "ftmusdt@aggTrade", "data": {k: v for k, v in data.items() if k != "q"}}),
        json.dumps({"stream": "ftmusdt@aggTrade", "data": {**data, "a": 1, "p": "NaN"}}),
        json.dumps({"stream": "ftmusdt@aggTrade", "data": {**data, "a": 2, "q": "1e999"}}),
        json.dumps({"stream": "ftmusdt@aggTrade", "data": "oops"}),
        json.dumps({"result": None, "id": 1}),                         # a subscription ack
    ]
    flow = make_flow()
    with WsServer(frames, [Session(inject={300: garbage})]) as server:
        feed = run(server, flow, len(frames) + len(garbage))

    c = flow.counters
    assert c.quarantined == {"malformed": 8, "missing_field": 1, "non_finite_price": 1,
                             "non_finite_size": 1}
    assert c.accepted == len(agg) and c.duplicates == 0 and c.reconciles()
    raws = [r for *_, r in flow.recent_quarantine]
    assert "{not json" in raws and agg[1][: len(agg[1]) // 2] in raws
    assert any("10000000000000000000" in r for r in raws)
    assert_same_bars(flow, SPOT)
    assert feed.health().ignored["response"] == 1 and feed.health().reconnects == 0


def test_oversized_frame_is_quarantined_without_a_reconnect():
    frames = capture_frames(SPOT)
    big = '{"stream":"ftmusdt@aggTrade","data":"' + "x" * 300_000 + '"}'
    config = ConnectionConfig(idle_s=5, backoff_base_s=0.01, max_frame_bytes=100_000,
                              hard_max_frame_bytes=1 << 20)
    flow = make_flow()
    with WsServer(frames, [Session(inject={100: [big]})]) as server:
        feed = run(server, flow, len(frames) + 1, config=config)
    assert flow.counters.quarantined == {"malformed": 1} and flow.counters.reconciles()
    assert flow.recent_quarantine[-1][3] == big[:500]
    assert feed.health().reconnects == 0 and "over max_frame_bytes" in feed.health().last_error
    assert_same_bars(flow, SPOT)


def test_frame_over_the_hard_limit_resets_the_connection_and_the_feed_recovers():
    # Tornado refuses to buffer it: the connection is closed (1009) and the feed reconnects;
    # the server replays from before the giant frame, the overlap is deduplicated.
    frames = capture_frames(SPOT)
    giant = "y" * 300_000
    config = ConnectionConfig(idle_s=5, backoff_base_s=0.01, max_frame_bytes=100_000,
                              hard_max_frame_bytes=200_000)
    sessions = [Session(inject={600: [giant]}), Session(start=550)]
    flow = make_flow()
    with WsServer(frames, sessions) as server:
        feed = run(server, flow, 600 + len(frames) - 550, config=config)
    h = feed.health()
    assert h.reconnects == 1 and h.quarantined == 0 and h.overlap == agg_frames(frames, 550, 600)
    assert flow.counters.duplicates == h.overlap and flow.counters.reconciles()
    assert_same_bars(flow, SPOT)


def test_silent_server_answering_pings_goes_stale_then_reconnects():
    frames = capture_frames(SPOT)
    config = ConnectionConfig(idle_s=0.8, backoff_base_s=0.01, healthy_after_s=5)
    sessions = [Session(stop=500, then="hold"), Session(start=500)]
    flow = make_flow()
    # The server drops clients whose pong is later than its ping interval: leave room for
    # the client to work through the backlog of frames before the ping.
    with WsServer(frames, sessions, ping_interval_s=0.25) as server:
        t0 = time.monotonic()
        feed = run(server, flow, len(frames), config=config)
        pongs = server.connections[0].pongs
    states = feed.tracker.states()
    assert states[:5] == ["CONNECTING", "LIVE", "STALE", "BACKOFF", "CONNECTING"], list(feed.tracker.transitions)
    assert pongs > 0  # the client answered the server's pings while it was silent
    assert time.monotonic() - t0 < 5
    assert flow.counters.accepted == agg_frames(frames) and flow.counters.reconciles()
    assert "no frame for 0.8 s" in feed.health().last_error


def test_kline_crosscheck_flags_a_divergent_closed_minute():
    minute = 1_628_952_360_000
    trades = [{"e": "aggTrade", "E": minute + i, "s": "FTMUSDT", "a": 100 + i, "p": p, "q": "2",
               "f": 10 + 2 * i, "l": 11 + 2 * i, "T": minute + 1000 * i, "m": False}
              for i, p in enumerate(["1.0", "3.0", "2.0"])]

    def kline(close: str) -> dict:
        return {"e": "kline", "E": minute + 60_000, "s": "FTMUSDT", "k": {
            "t": minute, "T": minute + 59_999, "s": "FTMUSDT", "i": "1m", "f": 10, "L": 15,
            "o": "1.0", "c": close, "h": "3.0", "l": "1.0", "v": "6", "n": 6, "x": True,
            "q": "12", "V": "6", "Q": "12", "B": "0"}}

    env = [json.dumps({"stream": "ftmusdt@aggTrade", "data": t}) for t in trades]
    frames = env + [json.dumps({"stream": "ftmusdt@kline_1m", "data": kline(c)}) for c in ("2.0", "2.5")]
    flow = make_flow()
    with WsServer(frames) as server:
        feed = run(server, flow, len(frames), streams=["ftmusdt@aggTrade", "ftmusdt@kline_1m"],
                   bar_lookup=flow_bar_lookup(flow))
    assert feed.klines_checked == 2
    events = [e for e in feed.tracker.recent_events if e["kind"] == "kline_divergence"]
    assert len(events) == 1 and events[0]["fields"] == {"close": (2.0, 2.5)}
    assert feed.health().events == {"kline_divergence": 1}


def test_captured_closed_klines_are_not_verifiable_and_raise_no_false_alarm():
    # Every closed kline in the captures began before recording started.
    flow = make_flow()
    frames = capture_frames(DATA / "binance_usdm_ws_combined_2021-07-22T2225Z.jsonl")
    with WsServer(frames) as server:
        feed = run(server, flow, len(frames), bar_lookup=flow_bar_lookup(flow))
    assert feed.klines_checked == 0 and feed.klines_unverifiable == 4
    assert "kline_divergence" not in feed.health().events


def test_subscribe_and_unsubscribe_on_the_live_connection():
    frames = capture_frames(SPOT)
    flow = make_flow()
    with WsServer(frames, [Session(stop=10, then="hold")]) as server:
        feed = BinanceFeed(flow.table, ["ftmusdt@aggTrade"], flow.push, url=server.url,
                           config=FAST).start()
        try:
            wait_until(lambda: feed.health().frames >= 10)
            feed.subscribe(["sxpbtc@aggTrade", "sxpbtc@kline_1m"])
            feed.unsubscribe(["ftmusdt@aggTrade"])
            wait_until(lambda: len(server.connections[0].received) == 2)
            with pytest.raises(FeedError, match="not both"):
                feed.subscribe(["sxpbtc@trade"])  # ids of @trade and @aggTrade would mix
        finally:
            feed.stop()
    sent = [json.loads(m) for m in server.connections[0].received]
    assert [m["method"] for m in sent] == ["SUBSCRIBE", "UNSUBSCRIBE"]
    assert sent[0]["params"] == ["sxpbtc@aggTrade", "sxpbtc@kline_1m"]
    assert sent[1]["params"] == ["ftmusdt@aggTrade"] and sent[0]["id"] != sent[1]["id"]
    assert feed.subscriptions == ["sxpbtc@aggTrade", "sxpbtc@kline_1m"]


def test_reconnect_uses_the_subscriptions_of_the_moment():
    frames = capture_frames(SPOT)
    sessions = [Session(stop=10, then="hold"), Session(start=10)]
    flow = make_flow()
    config = ConnectionConfig(idle_s=0.3, backoff_base_s=0.01)
    with WsServer(frames, sessions) as server:
        feed = BinanceFeed(flow.table, ["ftmusdt@aggTrade"], flow.push, url=server.url,
                           config=config).start()
        try:
            wait_until(lambda: feed.health().frames >= 10)
            feed.subscribe(["xmrbtc@aggTrade"])
            wait_until(lambda: server.wait_connections(2) and feed.health().frames >= len(frames))
        finally:
            feed.stop()
    assert server.connections[1].streams == ["ftmusdt@aggTrade", "xmrbtc@aggTrade"]


def test_stream_names_and_bad_subscriptions():
    assert stream_names(["BTCUSDT"], trades="trade") == ["btcusdt@trade"]
    with pytest.raises(FeedError, match="bad symbol"):
        stream_names(["btc/usdt"])
    with pytest.raises(FeedError, match="not both"):
        BinanceFeed(SymbolTable(), ["btcusdt@trade", "btcusdt@aggTrade"], lambda b, q: None)
    with pytest.raises(FeedError, match="unknown kind"):
        BinanceFeed(SymbolTable(), ["btcusdt@trade"], lambda b, q: None, kind="coinm")
    feed = BinanceFeed(SymbolTable(), ["btcusdt@aggTrade"], lambda b, q: None, kind="usdm")
    assert feed.url(feed.subscriptions) == "wss://fstream.binance.com/stream?streams=btcusdt@aggTrade"


def test_raw_trade_stream_parses_with_count_one():
    feed = BinanceFeed(SymbolTable(), ["bnbbtc@trade"], lambda b, q: None)
    frame = ('{"stream":"bnbbtc@trade","data":{"e":"trade","E":1672515782136,"s":"BNBBTC",'
             '"t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}')
    batch, q = feed.parse(frame, 0)
    assert batch.trade_id.tolist() == [12345] and batch.count.tolist() == [1] and not len(q)


def test_start_binance_runs_into_a_flow_and_sets_its_state():
    frames = capture_frames(SPOT)
    flow = make_flow()
    with WsServer(frames) as server:
        feed = start_binance(flow, ["ftmusdt", "sxpbtc"], url=server.url, config=FAST)
        try:
            wait_until(lambda: feed.health().frames == len(frames))
            assert feed.drain()
            assert flow.feed_state == "LIVE" and flow.feed_health().trades == agg_frames(frames)
        finally:
            feed.stop()
        assert server.connections[0].streams == ["ftmusdt@aggTrade", "ftmusdt@kline_1m",
                                                 "sxpbtc@aggTrade", "sxpbtc@kline_1m"]
    assert flow.feed_state == "STOPPED" and flow.counters.reconciles()
    flow.close()


# --------------------------------------------------------------------------- fuzz

_REAL = [json.loads(f) for f in capture_frames(SPOT) if "@aggTrade" in f or "@kline" in f][:6]
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids, max_size=4),
                     max_leaves=12)


@st.composite
def _mutated(draw) -> str:
    frame = json.loads(json.dumps(draw(st.sampled_from(_REAL))))
    data = frame["data"]
    target = data["k"] if "k" in data and draw(st.booleans()) else data
    for key in draw(st.lists(st.sampled_from(sorted(target)), max_size=3)):
        if draw(st.booleans()):
            target[key] = draw(_json)
        else:
            target.pop(key, None)
    text = json.dumps(frame)
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutated(), st.text(max_size=200), st.binary(max_size=200),
                 _json.map(json.dumps)))
def test_generated_frames_never_crash_the_parser(message):
    feed = BinanceFeed(SymbolTable(), ["ftmusdt@aggTrade"], lambda b, q: None)
    batch, q = feed.parse(message, 123)
    assert len(batch) + len(q) <= 1
    if len(q):
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        assert q.raw[0] == text[:500] and q.counts().keys() <= {"malformed", "missing_field"}
    if len(batch):  # whatever got through is a well-formed row (values checked by the validator)
        assert batch.count[0] >= 1 and batch.recv_time[0] == 123
