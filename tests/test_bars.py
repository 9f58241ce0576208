"""Bar engine: oracle tests against pandas, batch invariance, late trades, roll-ups."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from flows.bars import BarConfig, BarEngine
from flows.schema import NS, TIMEFRAMES, SymbolTable, TradeBatch
from flows.validate import Validator
from tests.oracle import (accepted_trades, adversarial_trades, assert_bars_equal, dataset_to_frame,
                          pandas_bars, rollup)

WINDOW = 30


def run_engine(df: pd.DataFrame, cuts: list[int], window: int = WINDOW, history: int = 5000):
    table = SymbolTable()
    validator = Validator(clock=lambda: 2**62)
    engine = BarEngine(table, BarConfig(window=window, history=history))
    bounds = [0, *sorted(set(cuts)), len(df)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a >= b:
            continue
        part = df.iloc[a:b]
        batch = TradeBatch.from_columns(table, time=part.time.to_numpy(), symbol=part.symbol.to_numpy(),
                                        price=part.price.to_numpy(), size=part["size"].to_numpy(),
                                        trade_id=part.trade_id.to_numpy())
        ok, _ = validator.process(batch)
        validator.quarantine_late(engine.update(ok).too_late)
    return engine, validator


@pytest.fixture(scope="module")
def adversarial():
    df = adversarial_trades()
    rng = np.random.default_rng(1)
    engine, validator = run_engine(df, list(rng.integers(0, len(df), 40)))
    return df, engine, validator


@pytest.mark.parametrize("tf", list(TIMEFRAMES))
def test_bars_equal_pandas_aggregation_of_accepted_trades(adversarial, tf):
    # Arrange: the adversarial tape, and the contract applied by hand trade by trade.
    df, engine, _ = adversarial
    want_trades, _ = accepted_trades(df, WINDOW)
    # Act
    got = dataset_to_frame(engine.dataset(tf))
    # Assert
    assert_bars_equal(got, pandas_bars(want_trades, tf))


@pytest.mark.parametrize("tf", [tf for tf in TIMEFRAMES if tf != "1m"])
def test_higher_timeframes_equal_their_1m_bars_rolled_up(adversarial, tf):
    _, engine, _ = adversarial
    assert_bars_equal(dataset_to_frame(engine.dataset(tf)), rollup(dataset_to_frame(engine.dataset("1m")), tf))


def test_counters_reconcile_with_hand_count(adversarial):
    df, _, validator = adversarial
    _, counts = accepted_trades(df, WINDOW)
    c = validator.counters
    assert c.received == len(df)
    assert c.duplicates == counts["duplicates"] == 60
    assert c.quarantined["too_late"] == counts["too_late"] >= 3
    assert c.quarantined_total == counts["invalid"] + counts["too_late"]
    assert c.reconciles()


def test_time_axis_has_no_rows_for_the_gap_hour(adversarial):
    _, engine, _ = adversarial
    times = pd.DatetimeIndex(engine.dataset("1m").time.values)
    in_gap = (times >= "2024-03-01 23:10") & (times < "2024-03-02 00:10")
    assert not in_gap.any()
    assert (engine.dataset("1m").trades.sum("symbol") > 0).all()


def test_daily_bars_split_at_utc_midnight(adversarial):
    _, engine, _ = adversarial
    days = engine.dataset("1d").time.values
    assert list(pd.DatetimeIndex(days).strftime("%Y-%m-%d")) == ["2024-03-01", "2024-03-02"]


def test_open_and_close_follow_event_time_then_trade_id_not_arrival():
    table = SymbolTable()
    engine = BarEngine(table, BarConfig(timeframes=("1m",)))
    t = 1_700_000_040 * NS
    # Arrives: the last trade first, then two trades at the same instant in reverse id order.
    b = TradeBatch.from_columns(table, time=[t + 50 * NS, t + NS, t + NS], symbol=["X"] * 3,
                                price=[3.0, 2.0, 1.0], size=[1.0, 1.0, 1.0], trade_id=[12, 11, 10])
    engine.update(b)
    row = engine.dataset("1m").isel(time=0, symbol=0)
    assert (float(row["open"]), float(row["close"]), int(row["trades"])) == (1.0, 3.0, 3)


def test_too_late_trade_is_refused_and_window_trade_amends():
    table = SymbolTable()
    engine = BarEngine(table, BarConfig(window=10, history=50))
    t0 = 1_700_000_040 * NS
    engine.update(TradeBatch.from_columns(table, time=[t0 + 20 * 60 * NS], symbol=["X"], price=[5.0], size=[1.0]))
    upd = engine.update(TradeBatch.from_columns(table, time=[t0 + 11 * 60 * NS, t0 + 10 * 60 * NS],
                                                symbol=["X", "X"], price=[4.0, 3.0], size=[1.0, 1.0]))
    assert len(upd.too_late) == 1 and upd.too_late.price.tolist() == [3.0]
    ds = engine.dataset("1m")
    # The amendment opened a bar between existing rows: rows stay sorted.
    assert list(ds["close"].values.ravel()) == [4.0, 5.0]
    assert np.all(np.diff(ds.time.values.astype("int64")) > 0)


def test_rolling_window_keeps_history_rows_and_memory_bounded():
    table = SymbolTable()
    engine = BarEngine(table, BarConfig(timeframes=("1m",), window=5, history=20))
    for m in range(200):
        engine.update(TradeBatch.from_columns(table, time=[(10**6 + m) * 60 * NS], symbol=["X"],
                                              price=[1.0], size=[1.0]))
        engine.take_changes("1m")
    assert 20 <= len(engine.dataset("1m").time) <= 30
    assert engine.frames["1m"].f.shape[1] < 100


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 1500), max_size=30), seed=st.integers(0, 3))
def test_batch_invariance(cuts, seed):
    df = adversarial_trades(seed=seed, n=1500)
    whole, _ = run_engine(df, [])
    cut, _ = run_engine(df, cuts)
    for tf in TIMEFRAMES:
        a, b = whole.dataset(tf), cut.dataset(tf)
        for name in ("open", "high", "low", "close", "trades"):
            np.testing.assert_array_equal(a[name].values, b[name].values)
        np.testing.assert_allclose(a.volume.values, b.volume.values, rtol=1e-12)


def test_checkpoint_state_resumes_identically():
    df = adversarial_trades(seed=3, n=2000)
    whole, _ = run_engine(df, [])
    first, validator = run_engine(df.iloc[:900], [])
    table = first.symbols
    resumed = BarEngine(table, first.config)
    resumed.restore(first.state())
    part = df.iloc[900:]
    ok, _ = validator.process(TradeBatch.from_columns(table, time=part.time.to_numpy(), symbol=part.symbol.to_numpy(),
                              price=part.price.to_numpy(), size=part["size"].to_numpy(),
                              trade_id=part.trade_id.to_numpy()))
    resumed.update(ok)
    for tf in TIMEFRAMES:
        assert_bars_equal(dataset_to_frame(resumed.dataset(tf)), dataset_to_frame(whole.dataset(tf)))
