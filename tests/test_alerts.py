"""Alerts on real S&P 500 daily bars: pandas oracles for every rule kind, cooldown, once, amendments, restart."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.alerts import (
    Alert,
    AlertEngine,
    AlertLog,
    Rule,
    analytics_values,
    load_rules,
    parse_duration,
    save_rules,
)
from flows.indicators import IndicatorEngine
from flows.schema import NS

DATA = Path(__file__).parent / "data" / "sp500_daily_ohlcv_2017-10-16_2018-02-07.csv"
DAY = 86_400 * NS


# -- fixtures ---------------------------------------------------------------------------------


def load_sp500(holes: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """505 stocks x 79 sessions: bar fields and every indicator (as the pipeline computes them)
    as (time x symbol) arrays; a stock absent on a day has no bar there (trades 0, NaN prices).
    ``holes``: the fraction of bars removed at random besides."""
    df = pd.read_csv(DATA)
    wide = {c: df.pivot(index="date", columns="Name", values=c) for c in ("open", "high", "low", "close", "volume")}
    times = pd.to_datetime(wide["close"].index).as_unit("ns").asi8
    fields = {k: v.to_numpy(np.float64, copy=True) for k, v in wide.items()}
    hole = np.random.default_rng(3).random(fields["close"].shape) < holes
    for k in fields:
        fields[k][hole] = np.nan
    fields["vwap"] = (fields["high"] + fields["low"] + fields["close"]) / 3
    fields["trades"] = np.where(np.isnan(fields["close"]), 0, 1).astype(np.int64)
    fields["volume"] = np.nan_to_num(fields["volume"])
    engine = IndicatorEngine()
    engine.update(times, fields, start=0, forming=False)
    values = dict(fields)
    values.update({k: v.copy() for k, v in engine.outputs().items() if k != "provisional"})
    return times, values, list(wide["close"].columns)


@pytest.fixture(scope="module")
def sp500():
    return load_sp500()


def rows(values: dict[str, np.ndarray], stop: int) -> dict[str, np.ndarray]:
    return {k: v[:stop] for k, v in values.items()}


def keys(alerts) -> list[tuple[int, str]]:
    return [(a.time, a.symbol) for a in alerts]


def run_live(engine: AlertEngine, times, values, symbols, begin: int = 1, end: int | None = None) -> list[Alert]:
    """Feed rows as a live flow does: one new bar per call, the newest still forming."""
    end = len(times) if end is None else end
    out = []
    for n in range(begin, end + 1):
        provisional = np.zeros(n, bool)
        provisional[-1] = True
        out += engine.evaluate("1d", times[:n], rows(values, n), symbols, start=n - 1, provisional=provisional)
    return out


# -- oracles (pandas, per symbol over its own bars) -------------------------------------------


def oracle_edges(times, symbols, value: np.ndarray, threshold: np.ndarray | float, op: str,
                 present: np.ndarray) -> list[tuple[int, str]]:
    """(time, symbol) where ``value op threshold`` holds and did not at the symbol's previous
    bar with a value; the first value of a series never fires. Sorted by time, then symbol."""
    compare = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal}[op]
    threshold = np.broadcast_to(threshold, value.shape)
    out = []
    for j, symbol in enumerate(symbols):
        frame = pd.DataFrame({"v": value[:, j], "t": threshold[:, j]}, index=times)
        frame = frame[present[:, j]].dropna()
        holds = pd.Series(compare(frame.v.to_numpy(), frame.t.to_numpy()), index=frame.index)
        edges = holds & ~holds.shift(1, fill_value=True)
        out += [(int(t), symbol) for t in edges.index[edges.to_numpy()]]
    return sorted(out, key=lambda k: (k[0], symbols.index(k[1])))


def apply_cooldown(edges: list[tuple[int, str]], cooldown: int) -> list[tuple[int, str]]:
    """Walk edges forward in time: fire unless the symbol fired less than ``cooldown`` ago."""
    last: dict[str, int] = {}
    out = []
    for t, symbol in edges:
        if symbol not in last or t - last[symbol] >= cooldown:
            out.append((t, symbol))
            last[symbol] = t
    return out


def rsi_edges(sp500, level=70.0, op=">"):
    times, values, symbols = sp500
    return oracle_edges(times, symbols, values["rsi_14"], level, op, values["trades"] > 0)


# -- rule kinds against the oracles -----------------------------------------------------------


def test_rsi_threshold_fires_once_per_crossing(sp500):
    # Arrange
    times, values, symbols = sp500
    want = rsi_edges(sp500)
    engine = AlertEngine(["* rsi_14 > 70 on 1d"])
    # Act
    got = engine.evaluate("1d", times, values, symbols)
    # Assert: exactly the pandas crossings, each once; many symbols cross more than once
    assert keys(got) == want
    assert len(want) > 1000 and pd.Series([s for _, s in want]).value_counts().max() > 3
    assert all(a.value > 70 and a.threshold == 70 and a.kind == "threshold" for a in got)


def test_live_rows_fire_on_close_exactly_like_the_batch(sp500):
    # Arrange: one new bar per call, the newest forming (closed-only rules skip it until it closes)
    times, values, symbols = sp500
    engine = AlertEngine(["* rsi_14 > 70 on 1d", "* rsi_14 < 30 on 1d"])
    want = sorted(rsi_edges(sp500) + rsi_edges(sp500, 30, "<"), key=lambda k: (k[0], symbols.index(k[1])))
    # Act
    live = run_live(engine, times, values, symbols)
    closed = engine.evaluate("1d", times, values, symbols, start=len(times))  # the last bar closes
    # Assert: the last bar fires only once closed; nothing fires twice
    last = int(times[-1])
    assert sorted(keys(live)) == sorted(k for k in want if k[0] != last)
    assert sorted(keys(closed)) == sorted(k for k in want if k[0] == last)
    # fired_at is the event time reached: the open of the next session, which closed the bar
    assert [a.fired_at for a in live] == [int(times[np.searchsorted(times, a.time) + 1]) for a in live]


def test_close_crosses_above_its_sma(sp500):
    times, values, symbols = sp500
    want = oracle_edges(times, symbols, values["close"], values["sma_20"], ">", values["trades"] > 0)
    got = AlertEngine(["* close crosses_above sma_20 on 1d"]).evaluate("1d", times, values, symbols)
    assert keys(got) == want and len(want) > 500
    assert all(a.kind == "cross" and a.value > a.threshold for a in got)


def test_single_symbol_crosses_below_a_price(sp500):
    times, values, symbols = sp500
    j = symbols.index("AAPL")
    want = oracle_edges(times, ["AAPL"], values["close"][:, [j]], 170.0, "<", values["trades"][:, [j]] > 0)
    got = AlertEngine(["AAPL close crosses_below 170 on 1d"]).evaluate("1d", times, values, symbols)
    assert keys(got) == want and len(want) >= 3
    assert got[0].message.startswith("AAPL close crossed below 170 at ")


def test_pct_change_over_a_time_window(sp500):
    # Oracle: the change since the symbol's last close at or before t - 7 days
    times, values, symbols = sp500
    stamps = pd.DatetimeIndex(times.view("datetime64[ns]"))
    close = pd.DataFrame(values["close"], index=stamps, columns=symbols)
    pct = np.full(close.shape, np.nan)
    for j, symbol in enumerate(symbols):
        own = close[symbol].dropna()
        ref = own.asof(stamps - pd.Timedelta("7D"))
        pct[:, j] = (close[symbol].to_numpy() / ref.to_numpy() - 1) * 100
    want = oracle_edges(times, symbols, pct, 5.0, ">", values["trades"] > 0)
    got = AlertEngine(["* pct_change 7d > 5 on 1d"]).evaluate("1d", times, values, symbols)
    assert keys(got) == want and len(want) > 500
    np.testing.assert_allclose([a.value for a in got],
                               [pct[np.searchsorted(times, t), symbols.index(s)] for t, s in want], rtol=1e-12)


def test_volume_spike_against_its_sma(sp500):
    times, values, symbols = sp500
    sma = pd.DataFrame(values["volume"]).where(values["trades"] > 0)
    sma = sma.apply(lambda col: col.dropna().rolling(20).mean().reindex(col.index))
    want = oracle_edges(times, symbols, values["volume"], 2.0 * sma.to_numpy(), ">", values["trades"] > 0)
    got = AlertEngine(["* volume > 2x volume_sma_20 on 1d"]).evaluate("1d", times, values, symbols)
    assert keys(got) == want and len(want) > 500
    assert got[0].kind == "volume_spike"


def test_quality_drop_once():
    # A quality score per (bar, symbol): drops below 60 twice for A, once for B; C never has a value
    times = np.arange(6, dtype=np.int64) * 60 * NS
    quality = np.array([[90, 95, np.nan], [55, 92, np.nan], [80, 50, np.nan],
                        [40, 45, np.nan], [90, 90, np.nan], [30, 80, np.nan]])
    engine = AlertEngine(["* quality < 60 on 1m once"])
    got = engine.evaluate("1m", times, {"quality": quality}, ["A", "B", "C"])
    assert [(a.time // (60 * NS), a.symbol, a.kind) for a in got] == [(1, "A", "quality"), (2, "B", "quality")]


@pytest.mark.parametrize("lookback", [0, 1, 5])
def test_short_lookback_and_sparse_symbols_give_the_same_edges(monkeypatch, lookback):
    # Live evaluation looks back a few rows for each symbol's previous value and re-scans the
    # symbols quiet there; with 30% of bars missing the re-scan is exercised on every row.
    import flows.alerts

    monkeypatch.setattr(flows.alerts, "LOOKBACK", lookback)
    data = load_sp500(holes=0.3)
    times, values, symbols = data
    rules = ["* rsi_14 > 60 on 1d", "* pct_change 7d > 3 on 1d", "* close crosses_below sma_20 on 1d"]
    want = AlertEngine(rules).evaluate("1d", times, values, symbols)
    engine = AlertEngine(rules)
    got = run_live(engine, times, values, symbols) + engine.evaluate("1d", times, values, symbols, start=len(times))
    assert sorted(keys(got)) == sorted(keys(want)) and len(want) > 1000
    assert sorted(keys(a for a in want if a.rule == rules[0])) == sorted(rsi_edges(data, 60))


# -- cooldown, once, amendments ---------------------------------------------------------------


@pytest.mark.parametrize("cooldown", ["5d", "10d", "3w"])
def test_cooldown_suppresses_refires_within_the_window(sp500, cooldown):
    times, values, symbols = sp500
    edges = rsi_edges(sp500)
    want = apply_cooldown(edges, parse_duration(cooldown))
    engine = AlertEngine([f"* rsi_14 > 70 on 1d cooldown {cooldown}"])
    got = run_live(engine, times, values, symbols)
    got += engine.evaluate("1d", times, values, symbols, start=len(times))
    assert keys(got) == want
    assert len(want) < len(edges)  # the cooldown did suppress some


def test_once_fires_the_first_crossing_of_each_symbol(sp500):
    times, values, symbols = sp500
    first: dict[str, int] = {}
    for t, s in rsi_edges(sp500):
        first.setdefault(s, t)
    want = sorted(((t, s) for s, t in first.items()), key=lambda k: (k[0], symbols.index(k[1])))
    engine = AlertEngine(["* rsi_14 > 70 on 1d once"])
    got = engine.evaluate("1d", times, values, symbols)
    assert keys(got) == want
    assert engine.evaluate("1d", times, values, symbols) == []


def test_reevaluating_amended_rows_fires_only_new_edges(sp500):
    # Arrange: all rows evaluated once
    times, values, symbols = sp500
    rule = "AAPL close crosses_above 172 on 1d"
    engine = AlertEngine([rule])
    j = symbols.index("AAPL")
    present = values["trades"][:, [j]] > 0
    before = engine.evaluate("1d", times, values, symbols)
    # Act 1: the same rows again, from the start -> nothing
    again = engine.evaluate("1d", times, values, symbols, start=0)
    # Act 2: amend a bar below the level (between two) to above it: a new edge there; the edge
    # the next bar had is gone, and a fired alert is never taken back nor fired twice
    close = values["close"][:, j]
    k = next(i for i in range(1, len(close) - 1) if close[i - 1] < 172 and close[i] < 172 and close[i + 1] > 172)
    amended = dict(values, close=values["close"].copy())
    amended["close"][k, j] = 175.0
    after = engine.evaluate("1d", times, amended, symbols, start=k)
    # Assert
    want_before = oracle_edges(times, ["AAPL"], values["close"][:, [j]], 172.0, ">", present)
    want_after = oracle_edges(times, ["AAPL"], amended["close"][:, [j]], 172.0, ">", present)
    assert keys(before) == want_before and again == []
    assert keys(after) == sorted(set(want_after) - set(want_before)) == [(int(times[k]), "AAPL")]


def test_cooldown_holds_around_alerts_fired_later_in_bar_time():
    # An amendment creates an edge just before a bar that already fired: within the cooldown,
    # it does not fire (replays stay deterministic whatever order rows are evaluated in).
    times = np.arange(8, dtype=np.int64) * 60 * NS
    close = np.array([[1.0], [1.0], [1.0], [1.0], [1.0], [3.0], [1.0], [3.0]])
    engine = AlertEngine(["X close > 2 on 1m cooldown 3m"])
    assert [a.time // (60 * NS) for a in engine.evaluate("1m", times, {"close": close}, ["X"])] == [5]
    amended = close.copy()
    amended[3] = 3.0  # minute 3: 2 minutes before the alert at 5
    assert engine.evaluate("1m", times, {"close": amended}, ["X"], start=3) == []
    amended[1] = 3.0  # minute 1: 4 minutes before it, beyond the cooldown
    assert [a.time // (60 * NS) for a in engine.evaluate("1m", times, {"close": amended}, ["X"], start=1)] == [1]


# -- restart ----------------------------------------------------------------------------------


RESTART_RULES = ["* rsi_14 > 70 on 1d cooldown 10d", "* rsi_14 < 35 on 1d once",
                 "* close crosses_above sma_20 on 1d", "* pct_change 7d > 5 on 1d forming"]


def test_restart_replaying_the_same_rows_fires_nothing_new(sp500, tmp_path):
    times, values, symbols = sp500
    reference = AlertEngine(RESTART_RULES)
    want = run_live(reference, times, values, symbols)
    # First run: 50 sessions, logged
    log_path = tmp_path / "alerts.jsonl"
    first = run_live(AlertEngine(RESTART_RULES, log=log_path), times, values, symbols, end=50)
    # A crash cut the last line short
    with open(log_path, "a") as fh:
        fh.write('{"rule_id": "abc", "sym')
    # Restart: a new engine on the same log re-evaluates every row in memory, then goes on
    engine = AlertEngine(RESTART_RULES, log=log_path)
    provisional = np.zeros(50, bool)
    provisional[-1] = True
    replayed = engine.evaluate("1d", times[:50], rows(values, 50), symbols, start=0, provisional=provisional)
    rest = run_live(engine, times, values, symbols, begin=51)
    assert replayed == []
    assert [a.to_dict() for a in first + rest] == [a.to_dict() for a in want]
    assert engine.log.skipped == 1
    assert len(AlertLog(log_path).read()) == len(want)
    assert list(engine.recent) == (first + rest)[-engine.recent.maxlen:]


def test_alert_log_round_trips_every_field(tmp_path):
    alert = Alert("0123456789ab", "X close > 1 on 1m", "threshold", "X", "1m", 60 * NS + 5, 1.5,
                  float("nan"), "msg", 120 * NS)
    log = AlertLog(tmp_path / "a" / "alerts.jsonl")
    log.append([alert, alert])
    line = json.loads((tmp_path / "a" / "alerts.jsonl").read_text().splitlines()[0])
    assert line["time"] == "1970-01-01T00:01:00.000000005Z" and line["threshold"] is None
    got = log.read()
    assert got[0].to_dict() == alert.to_dict() and len(got) == 2


def test_rule_added_at_runtime_ignores_history_also_after_restart(sp500, tmp_path):
    times, values, symbols = sp500
    rules_path, log_path = tmp_path / "alerts.yaml", tmp_path / "alerts.jsonl"
    engine = AlertEngine.open(rules_path, log_path)
    run_live(engine, times, values, symbols, end=40)
    rule = engine.add_rule("* rsi_14 > 70 on 1d")
    assert rule.since == int(times[39])
    got = run_live(engine, times, values, symbols, begin=41)
    want = [k for k in rsi_edges(sp500) if times[39] <= k[0] < times[-1]]
    assert keys(got) == want
    # Restart from the saved rules and the log: the whole window again, nothing new
    again = AlertEngine.open(rules_path, log_path)
    assert again.rules == (rule,)
    provisional = np.zeros(len(times), bool)
    provisional[-1] = True
    assert again.evaluate("1d", times, values, symbols, start=0, provisional=provisional) == []
    assert again.remove_rule(rule.text) and load_rules(rules_path) == []


# -- the stream, runtime changes, the flow ----------------------------------------------------


def test_stream_and_subscribers_get_each_alert(sp500):
    times, values, symbols = sp500
    engine = AlertEngine(["* rsi_14 > 70 on 1d"], recent=5)
    seen = engine.stream.sink_to_list()
    called = []
    sink = engine.subscribe(called.append)
    got = engine.evaluate("1d", times[:30], rows(values, 30), symbols)
    assert seen == called == got and len(got) > 5
    assert list(engine.recent) == got[-5:]
    sink.destroy()
    more = engine.evaluate("1d", times, values, symbols, start=30)
    assert seen == got + more and called == got


def test_missing_columns_are_skipped_and_reported():
    engine = AlertEngine(["* quality < 60 on 1m"])
    got = engine.evaluate("1m", np.array([0, 60 * NS]), {"close": np.ones((2, 1))}, ["X"])
    assert got == [] and engine.missing == {(engine.rules[0].id, "quality")}


def test_rules_change_safely_while_evaluating(sp500):
    times, values, symbols = sp500
    engine = AlertEngine(["* rsi_14 > 70 on 1d"])
    rsi = engine.rules[0].id
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            rule = engine.add_rule(f"* close > {100 + i % 7} on 1d")
            engine.remove_rule(rule)
            i += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        got = run_live(engine, times, values, symbols)
    finally:
        stop.set()
        worker.join()
    got = [a for a in got if a.rule_id == rsi]
    assert keys(got) == [k for k in rsi_edges(sp500) if k[0] != times[-1]]


def test_flow_analytics_feed_the_engine():
    from flows.pipeline import Flow, FlowConfig
    from flows.runner import replay_files

    flow = Flow(FlowConfig(store=None, timeframes=("1d",)))
    replay_files(flow, [str(DATA)], bars="1d")
    flow.analytics.refresh()
    times, values, provisional = analytics_values(flow.analytics, "1d")
    got = AlertEngine(["* rsi_14 > 70 on 1d"]).evaluate("1d", times, values, flow.symbols(), 0, provisional)
    symbols = flow.symbols()
    want = oracle_edges(times, symbols, values["rsi_14"], 70.0, ">", values["trades"] > 0)
    assert keys(got) == [k for k in want if k[0] != times[-1]] and len(got) > 1000
    assert provisional.tolist() == [False] * (len(times) - 1) + [True]


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, canonical, kind", [
    ("AAPL close crosses_above 190 on 1m", None, "cross"),
    ("*  rsi_14 >  70 on 5m cooldown 15m", "* rsi_14 > 70 on 5m cooldown 15m", "threshold"),
    ("BTCUSDT pct_change 5m > 2", "BTCUSDT pct_change 5m > 2 on 1m", "pct_change"),
    ("* volume > 3x volume_sma_20 on 1m", None, "volume_spike"),
    ("* quality < 60 on 1m once", None, "quality"),
    ("ETH-USD volume pct_change 1h <= -50.5 on 5m forming", None, "pct_change"),
    ("X close crosses_below sma_50 on 1d cooldown 2d once since 2018-01-05", 
     "X close crosses_below sma_50 on 1d cooldown 2d once since 2018-01-05T00:00:00Z", "cross"),
    ("X close >= 1e-05 on 4h cooldown 90s", None, "threshold"),
])
def test_rule_text_round_trip(text, canonical, kind):
    rule = Rule.parse(text)
    assert rule.text == (canonical or text)
    assert Rule.parse(rule.text) == rule and Rule.parse(rule.text).id == rule.id
    assert rule.kind == kind


def test_rule_dicts_and_yaml(tmp_path):
    rule = Rule.parse({"symbol": "*", "field": "rsi_14", "op": ">", "level": 70, "tf": "5m", "cooldown": "15m"})
    assert rule == Rule.parse("* rsi_14 > 70 on 5m cooldown 15m")
    assert Rule.parse({"symbol": "*", "field": "volume", "op": ">", "level": 3, "ref": "volume_sma_20"}).text \
        == "* volume > 3x volume_sma_20 on 1m"
    path = tmp_path / "alerts.yaml"
    rules = [rule, Rule.parse("AAPL close crosses_above 190.25 on 1m since 2024-03-01T09:30:00.5Z")]
    save_rules(path, rules)
    assert load_rules(path) == rules
    path.write_text("rules:\n  - BTCUSDT pct_change 5m > 2\n  - {symbol: X, op: '<', level: 3, since: 2018-01-05}\n"
                    "  - rule: X close > 2 once\n")
    assert [r.text for r in load_rules(path)] == [
        "BTCUSDT pct_change 5m > 2 on 1m", "X close < 3 on 1m since 2018-01-05T00:00:00Z", "X close > 2 on 1m once"]


@pytest.mark.parametrize("spec, problem", [
    ("AAPL close crosses 190", "unknown operator 'crosses'"),
    ("AAPL clse > 190", "unknown column 'clse'"),
    ("* rsi_14 > 70 on 2m", "unknown timeframe '2m'"),
    ("* rsi_14 > 70 cooldown 15", "bad duration '15'"),
    ("* rsi_14 > seventy", "unknown column 'seventy'"),
    ("* rsi_14 > 1e999", "bad level '1e999'"),
    ("* volume > 3x", "needs a column"),
    ("* rsi_14 > 70 on", "'on' needs a value"),
    ("* rsi_14 > 70 every 5m", "unexpected 'every'"),
    ("AAPL close >", "expected 'SYMBOL FIELD OP VALUE"),
    ("X pct_change 5m >", "expected 'pct_change WINDOW OP NUMBER'"),
    ("X close > 1 since yesterday-ish", "bad time 'yesterday-ish'"),
    ({"symbol": "X", "op": ">", "lvl": 3}, "unknown key 'lvl'"),
    ({"symbol": "X", "op": ">"}, "missing key 'level'"),
])
def test_bad_rules_raise_one_line_errors(spec, problem):
    with pytest.raises(ValueError) as info:
        Rule.parse(spec)
    message = str(info.value)
    assert problem in message and "\n" not in message and message.startswith("bad alert rule ")
