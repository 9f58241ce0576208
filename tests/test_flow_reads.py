"""What the dashboards read from a flow: through its cache, one symbol's indicators, the
quarantine log, alert rules and fired alerts, feed health and the monitor's stage figures.

The trades are QuantConnect LEAN's real IBM prints of 2013-10-07 (tests/data/README.md).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib

from flows.pipeline import Flow, FlowConfig
from flows.schema import NS, Quarantine, TradeBatch

TICKS = Path(__file__).parent / "data" / "lean_20131007_ibm_Trade_Tick.csv"
#: 2013-10-07 00:00 America/New_York (EDT, UTC-4) in ns since the epoch.
MIDNIGHT_ET = pd.Timestamp("2013-10-07 04:00", tz="UTC").value


def ibm_batch(flow: Flow, recv_time: int = 0) -> TradeBatch:
    raw = pd.read_csv(TICKS, header=None, names=["ms", "price", "size", "exchange", "cond", "suspicious"])
    return TradeBatch.from_columns(
        flow.table, time=MIDNIGHT_ET + raw["ms"].to_numpy(np.int64) * 1_000_000, symbol=["IBM"] * len(raw),
        price=raw["price"].to_numpy(float) / 10_000, size=raw["size"].to_numpy(float),
        recv_time=recv_time)


@pytest.fixture(scope="module")
def flow() -> Flow:
    flow = Flow(FlowConfig(store=None, timeframes=("1m", "5m"), history=600))
    flow.push(ibm_batch(flow))
    return flow


def test_reads_go_through_the_cache_once_per_version(flow):
    before = flow.cache.stats()
    frames = [flow.bars("1m", "IBM") for _ in range(20)]
    views = [flow.breadth("1m") for _ in range(20)]
    after = flow.cache.stats()
    assert after.misses - before.misses <= 2 and after.hits - before.hits >= 38
    assert all(f is frames[0] for f in frames) and all(v is views[0] for v in views)
    version = flow.version()
    flow.push(TradeBatch.from_columns(flow.table, time=[int(frames[0].index[-1].value) + NS],
                                      symbol=["IBM"], price=[190.0], size=[5.0]))
    assert flow.version() > version
    fresh = flow.bars("1m", "IBM")
    assert fresh is not frames[0] and fresh["volume"].iloc[-1] == frames[0]["volume"].iloc[-1] + 5


def test_symbol_indicators_equal_talib_on_the_flows_own_bars(flow):
    bars = flow.bars("1m", "IBM")
    ind = flow.symbol_indicators("1m", "IBM")
    assert ind.index.equals(bars.index) and len(bars) > 300
    close, high, low = (bars[c].to_numpy() for c in ("close", "high", "low"))
    np.testing.assert_allclose(ind["sma_20"], talib.SMA(close, 20), rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(ind["rsi_14"], talib.RSI(close, 14), rtol=1e-9, equal_nan=True)
    macd, signal, _ = talib.MACD(close, 12, 26, 9)
    np.testing.assert_allclose(ind["macd"], macd, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(ind["atr_14"], talib.ATR(high, low, close, 14), rtol=1e-9, equal_nan=True)
    assert ind["provisional"].tolist() == [False] * (len(ind) - 1) + [True]
    tail = flow.symbol_indicators("1m", "IBM", n=5)
    pd.testing.assert_frame_equal(tail, ind.iloc[-5:])
    assert flow.symbol_indicators("1m", "NOPE").empty


def test_quarantine_log_newest_first_with_reasons():
    flow = Flow(FlowConfig(store=None, timeframes=("1m",)))
    t = 1_700_000_000 * NS
    flow.push(TradeBatch.from_columns(flow.table, time=[t, t + NS, t + 2 * NS], symbol=["A", "A", "B"],
                                      price=[1.0, -1.0, float("nan")], size=[1.0, 1.0, 1.0]),
              Quarantine.malformed(['{"broken'], "malformed"))
    log = flow.quarantine_log()
    assert log["reason"].tolist() == ["non_finite_price", "non_positive_price", "malformed"]
    assert log["symbol"].tolist() == ["B", "A", ""] and log["raw"].iloc[-1] == '{"broken'
    assert log["time"].iloc[0] == pd.Timestamp(t + 2 * NS) and pd.isna(log["time"].iloc[-1])
    assert len(flow.quarantine_log(n=1)) == 1


def test_alert_rules_added_removed_and_fired():
    flow = Flow(FlowConfig(store=None, timeframes=("1m",)))
    with pytest.raises(ValueError, match="bad alert rule") as err:
        flow.add_alert_rule("IBM close >>> 3")
    assert "\n" not in str(err.value) and flow.alert_rules() == []
    rule = flow.add_alert_rule("IBM close crosses_above 182.5 on 1m")
    assert flow.alert_rules() == [rule] and rule["kind"] == "cross"
    seen = flow.taps["alerts"].sink_to_list()
    flow.push(ibm_batch(flow))
    flow.flush()  # without a store, flushing evaluates the rules
    fired = flow.fired_alerts()
    closes = flow.bars("1m", "IBM")["close"]
    crossings = ((closes > 182.5) & (closes.shift() <= 182.5)).sum()
    assert len(fired) == crossings > 0 and set(fired["symbol"]) == {"IBM"}
    assert fired["time"].is_monotonic_decreasing and len(seen) == len(fired)
    assert flow.remove_alert_rule(rule["id"]) and flow.alert_rules() == []
    assert not flow.remove_alert_rule("no such rule")


def test_a_flow_without_store_keeps_history_bars_once_flushed():
    flow = Flow(FlowConfig(store=None, timeframes=("1m",), window=10, history=50))
    flow.push(ibm_batch(flow))
    frame = flow.engine.frames["1m"]
    assert frame.n == 453  # nothing taken yet: nothing may go
    flow.flush()
    last = flow.bars("1m", "IBM").iloc[-1]
    flow.push(TradeBatch.from_columns(flow.table, time=[int(last.name.value) + 60 * NS],
                                      symbol=["IBM"], price=[183.0], size=[1.0]))
    assert 50 <= frame.n <= 64 and flow.bars("1m", "IBM").index[-1] == last.name + pd.Timedelta("1min")
    assert flow._pending_quarantine == []


def test_feed_health_and_monitor_stage_figures():
    flow = Flow(FlowConfig(store=None, timeframes=("1m",), feed="replay"))
    assert flow.feed_healths()[0]["feed"] == "replay"
    flow.push(ibm_batch(flow, recv_time=time.time_ns() - 5_000_000))
    m = flow.monitor()
    assert m["latency_ms_p50"] >= 5.0 and m["latency_ms_p99"] >= m["latency_ms_p50"]
    assert all(m["stage_rates"][k] > 0 for k in ("validate", "quality", "bars"))
    flow.register_feed("venue-a", lambda: {"state": "LIVE", "reconnects": 2})
    assert flow.feed_healths() == [{"state": "LIVE", "reconnects": 2, "feed": "venue-a"}]


READS = {
    "bars": lambda f, tf, s: f.bars(tf, s),
    "symbol_indicators": lambda f, tf, s: f.symbol_indicators(tf, s),
    "indicators": lambda f, tf, s: f.indicators(tf),
    "breadth": lambda f, tf, s: f.breadth(tf),
    "heatmap": lambda f, tf, s: f.heatmap(tf),
    "sectors": lambda f, tf, s: f.sectors(tf),
    "quality": lambda f, tf, s: f.quality(tf),
    "quality_feeds": lambda f, tf, s: f.quality_feeds(tf),
    "quarantine_log": lambda f, tf, s: f.quarantine_log(),
    "fired_alerts": lambda f, tf, s: f.fired_alerts(),
    "monitor": lambda f, tf, s: f.monitor(),
    "status": lambda f, tf, s: f.status(),
}


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_every_read_works_before_the_first_batch_and_after_it(order):
    # A served page can be opened while the feed has named its symbols (with sectors) and
    # pushed nothing yet. Two such reads raised in CI: the quality of feeds (a grid widened
    # by the symbols' read) and the sectors after the heatmap had named them.
    from flows.feeds.simulated import SimulatedMarket

    flow = Flow(FlowConfig(store=None, timeframes=("1m", "5m"), history=120, window=30))
    market = SimulatedMarket(flow.table, n_symbols=12, rate=50.0, seed=3,
                             start_ns=MIDNIGHT_ET + 14 * 3600 * NS, batch_ms=1000)
    symbol = market.tickers[0]
    names = list(READS) if order == "forward" else list(READS)[::-1]
    for tf in ("1m", "5m"):
        for name in names:
            READS[name](flow, tf, symbol)
        assert flow.bars(tf, symbol).empty
        assert flow.quality(tf).sizes["time"] == 0
        assert flow.sectors(tf).sizes["time"] == 0
    batches = market.batches(90)
    flow.push(next(batches))
    for tf in ("1m", "5m"):
        for name in names:
            READS[name](flow, tf, symbol)
    for batch in batches:
        flow.push(batch)
    for tf in ("1m", "5m"):
        for name in names:
            READS[name](flow, tf, symbol)
        assert len(flow.bars(tf, symbol)) >= 1
        assert flow.quality(tf).sizes["symbol"] == 12
        sectors = flow.sectors(tf)
        assert sectors.sizes["sector"] == len(set(sectors["sector"].values))
        assert set(sectors["sector"].values) == {flow.table.meta[t]["sector"]
                                                 for t in market.tickers}
        assert 0 < len(flow.heatmap(tf)) <= 12  # the symbols that traded
    flow.close()
