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
