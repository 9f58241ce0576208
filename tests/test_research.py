"""flows.research: the backtest against hand-computed figures, rotation ranks, the replay helper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flows.research import backtest, performance, replay_bars, weekly_rotation

DATA = Path(__file__).resolve().parent / "data"


def tiny() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two symbols, four bars; B has no bar at t2."""
    close = pd.DataFrame({"A": [100.0, 110.0, 99.0, 99.0], "B": [50.0, 50.0, np.nan, 60.0]},
                         index=pd.date_range("2018-01-01", periods=4, freq="D"))
    signal = pd.DataFrame({"A": [True, True, False, True], "B": [False, True, True, True]},
                          index=close.index)
    return signal, close


def test_backtest_matches_hand_computation():
    # Arrange: by hand, N = (2, 2, 1, 2) symbols with a close
    # weights set at each close: t0 A .5 | t1 A .5, B .5 | t2 (B has no close) none | t3 A .5, B .5
    # turnover at each close:    t0 .5   | t1 .5          | t2 1.0                  | t3 1.0
    # period (t0,t1]: A .5 x +10 %                         = .05;   cost .5 x 10 bps = .0005
    # period (t1,t2]: A .5 x -10 %, B .5 x no bar (0)      = -.05;  cost .5 x 10 bps = .0005
    # period (t2,t3]: flat                                 = 0;     cost 1 x 10 bps  = .001
    signal, close = tiny()

    # Act
    result = backtest(signal, close, cost_bps=10.0)

    # Assert
    np.testing.assert_allclose(result["exposure"], [0.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(result["turnover"], [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(result["gross"], [0.0, 0.05, -0.05, 0.0])
    np.testing.assert_allclose(result["cost"], [0.0, 0.0005, 0.0005, 0.001])
    np.testing.assert_allclose(result["net"], [0.0, 0.0495, -0.0505, -0.001])
    np.testing.assert_allclose(result["equity"], np.cumprod([1.0, 1.0495, 0.9495, 0.999]))
    assert list(result.index) == list(close.index)


def test_signal_acts_from_the_next_bar():
    # Arrange: the same rule, except that at t1 it drops A
    signal, close = tiny()
    changed = signal.copy()
    changed.loc[close.index[1], "A"] = False

    # Act
    base, after = backtest(signal, close), backtest(changed, close)

    # Assert: rows up to t1 are untouched (no look-ahead); the change shows from t2 on
    pd.testing.assert_frame_equal(base.iloc[:2], after.iloc[:2])
    assert after["gross"].iloc[2] == 0.0 and base["gross"].iloc[2] == pytest.approx(-0.05)


def test_costs_scale_with_turnover_only():
    signal, close = tiny()
    free, costly = backtest(signal, close, cost_bps=0.0), backtest(signal, close, cost_bps=25.0)
    pd.testing.assert_series_equal(free["gross"], costly["gross"])
    np.testing.assert_allclose(free["net"] - costly["net"], costly["turnover"] * 25e-4)


def test_always_long_is_equal_weight_buy_and_hold_with_one_entry_cost():
    rng = np.random.default_rng(3)
    close = pd.DataFrame(100 * np.exp(np.cumsum(rng.normal(0, 0.01, (30, 4)), axis=0)))
    result = backtest(pd.DataFrame(True, index=close.index, columns=close.columns), close,
                      cost_bps=5.0)
    expected = close.pct_change().mean(axis=1).fillna(0.0)  # pandas oracle: daily rebalanced
    expected.iloc[1] -= 5e-4
    np.testing.assert_allclose(result["net"], expected)
    assert result["turnover"].sum() == pytest.approx(1.0)


def test_performance_figures():
    equity = np.array([1.0, 1.1, 0.99, 1.089])
    result = pd.DataFrame({"exposure": [0.0, 1.0, 1.0, 0.5], "turnover": [0.0, 1.0, 0.0, 0.5],
                           "net": [0.0, 0.1, -0.1, 0.1], "equity": equity})
    stats = performance(result, periods_per_year=3)
    net = np.array([0.1, -0.1, 0.1])
    assert stats["total_return"] == pytest.approx(0.089)
    assert stats["cagr"] == pytest.approx(0.089)  # three periods = one year
    assert stats["volatility"] == pytest.approx(net.std(ddof=1) * np.sqrt(3))
    assert stats["sharpe"] == pytest.approx(net.mean() / net.std(ddof=1) * np.sqrt(3))
    assert stats["max_drawdown"] == pytest.approx(0.99 / 1.1 - 1)
    assert stats["turnover"] == pytest.approx(1.5)
    assert stats["exposure"] == pytest.approx(2.5 / 3)


def test_weekly_rotation_ranks_relative_strength():
    days = pd.date_range("2018-01-01", periods=10, freq="B")  # two whole weeks
    returns = pd.DataFrame({"X": 0.01, "Y": -0.01, "Z": 0.0}, index=days)
    market = pd.Series(0.02, index=days)
    table = weekly_rotation(returns, market)
    assert list(table["week"].unique()) == list(pd.to_datetime(["2018-01-05", "2018-01-12"]))
    week = table[table["week"] == "2018-01-05"].set_index("sector")
    assert week.loc["X", "return"] == pytest.approx(1.01 ** 5 - 1)
    assert week.loc["X", "relative"] == pytest.approx(1.01 ** 5 - 1.02 ** 5)
    assert week["rank"].to_dict() == {"X": 1, "Z": 2, "Y": 3}


def test_replay_bars_writes_the_analytics(tmp_path):
    store = tmp_path / "sp500.zarr"
    summary = replay_bars(DATA / "sp500_daily_ohlcv_2017-10-16_2018-02-07.csv", store,
                          DATA / "sp500_constituents_sectors_2018-04-02.csv")
    assert summary.rows == 39_860
    breadth = xr.open_zarr(str(store), group="breadth/1d")
    day = breadth.sel(time="2018-02-05")
    assert (int(day.advancers), int(day.decliners)) == (2, 503)
    sectors = xr.open_zarr(str(store), group="sectors/1d")
    assert "Information Technology" in sectors.sector.values
