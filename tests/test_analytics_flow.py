"""Analytics through the whole flow: S&P 500 daily bars replayed into a store, read back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib
import xarray as xr

from flows.pipeline import Flow, FlowConfig
from flows.runner import replay_files

DATA = Path(__file__).parent / "data"
SP500 = DATA / "sp500_daily_ohlcv_2017-10-16_2018-02-07.csv"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sp") / "sp.zarr"
    flow = Flow(FlowConfig(store=str(path)))
    from flows.breadth import read_symbols_file

    flow.table.meta.update(read_symbols_file(str(DATA / "sp500_constituents_sectors_2018-04-02.csv")))
    replay_files(flow, [str(SP500)], bars="1d")
    flow.close()
    return path


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return pd.read_csv(SP500, parse_dates=["date"])


def test_stored_indicators_equal_talib(store, raw):
    ind = xr.open_zarr(store, group="indicators/1d").load()
    for symbol in ("AAPL", "MSFT", "XOM"):
        d = raw[raw.Name == symbol].set_index("date")
        got = ind.sel(symbol=symbol)
        checks = {
            "sma_20": talib.SMA(d.close.values, 20),
            "ema_12": talib.EMA(d.close.values, 12),
            "rsi_14": talib.RSI(d.close.values, 14),
            "atr_14": talib.ATR(d.high.values, d.low.values, d.close.values, 14),
            "adx_14": talib.ADX(d.high.values, d.low.values, d.close.values, 14),
            "macd": talib.MACD(d.close.values, 12, 26, 9)[0],
            "bb_upper": talib.BBANDS(d.close.values, 20, 2, 2, 0)[0],
            "stoch_k": talib.STOCH(d.high.values, d.low.values, d.close.values, 14, 3, 0, 3, 0)[0],
        }
        for name, want in checks.items():
            values = got[name].to_pandas().reindex(d.index).to_numpy()
            np.testing.assert_allclose(values, want, atol=1e-9, equal_nan=True, err_msg=f"{symbol} {name}")
    # Only the newest bar is still forming.
    assert ind.provisional.values.tolist() == [False] * 78 + [True]


def test_stored_breadth_counts_2018_02_05(store, raw):
    breadth = xr.open_zarr(store, group="breadth/1d").load()
    row = breadth.sel(time="2018-02-05")
    assert (int(row.advancers), int(row.decliners)) == (2, 503)
    # The A/D line is the running sum of advancers - decliners, by hand.
    close = raw.pivot(index="date", columns="Name", values="close")
    diff = np.sign(close.diff())
    net = (diff > 0).sum(axis=1) - (diff < 0).sum(axis=1)
    np.testing.assert_array_equal(breadth.ad_line.values[1:], net.cumsum().values[1:])


def test_stored_sectors_have_gics_names(store):
    sectors = xr.open_zarr(store, group="sectors/1d").load()
    names = set(sectors.sector.values.tolist())
    assert {"Information Technology", "Financials", "Energy"} <= names
    day = sectors.sel(time="2018-02-05")
    assert int(day.advancers.sum()) == 2 and int(day.decliners.sum()) == 503


def test_restart_continues_breadth_and_indicators(tmp_path, store, raw):
    # Arrange: the same file split in two, replayed with a restart in between.
    first_half = tmp_path / "a.csv"
    second_half = tmp_path / "b.csv"
    dates = sorted(raw.date.unique())
    raw[raw.date < dates[40]].to_csv(first_half, index=False)
    raw[raw.date >= dates[40]].to_csv(second_half, index=False)
    path = tmp_path / "split.zarr"
    for part in (first_half, second_half):
        flow = Flow(FlowConfig(store=str(path), window=30, history=60))
        replay_files(flow, [str(part)], bars="1d")
        flow.close()
    # Assert: breadth identical to the uninterrupted run; SMAs exact, EMAs within float noise.
    whole_b = xr.open_zarr(store, group="breadth/1d").load()
    split_b = xr.open_zarr(path, group="breadth/1d").load()
    for name in ("advancers", "decliners", "ad_line", "new_highs", "new_lows"):
        np.testing.assert_array_equal(split_b[name].values, whole_b[name].values, err_msg=name)
    whole_i = xr.open_zarr(store, group="indicators/1d").load()
    split_i = xr.open_zarr(path, group="indicators/1d").load()
    assert split_i.sizes == whole_i.sizes
    np.testing.assert_allclose(split_i.sma_20.values, whole_i.sma_20.values, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(split_i.ema_12.values, whole_i.ema_12.values, rtol=1e-6, equal_nan=True)
