"""Ready-made bars in: a venue's minute bars and daily files are rolled up like trades."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flows.pipeline import Flow, FlowConfig
from flows.runner import replay_files
from tests.oracle import FREQ, dataset_to_frame

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def ibm_minutes(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """LEAN's IBM minute bars of 2013-10-07 as a bars CSV (times converted from ms after
    midnight New York to UTC, prices from 1/10000 dollars)."""
    raw = pd.read_csv(DATA / "lean_20131007_ibm_minute_trade.csv", header=None,
                      names=["ms", "open", "high", "low", "close", "volume"])
    day = pd.Timestamp("2013-10-07", tz="America/New_York")
    df = pd.DataFrame({
        "time": (day + pd.to_timedelta(raw.ms, unit="ms")).dt.tz_convert("UTC").dt.tz_localize(None),
        "symbol": "IBM",
        **{c: raw[c] / 10000 for c in ("open", "high", "low", "close")},
        "volume": raw.volume.astype(float),
    })
    path = tmp_path_factory.mktemp("bars") / "ibm_1m.csv"
    df.to_csv(path, index=False)
    return path, df


@pytest.mark.parametrize("tf", ["1m", "5m", "15m", "1h", "4h", "1d"])
def test_minute_bars_roll_up_like_pandas_resample(tmp_path, ibm_minutes, tf):
    path, df = ibm_minutes
    flow = Flow(FlowConfig(store=str(tmp_path / "m.zarr")))
    replay_files(flow, [str(path)], bars="1m")
    flow.close()
    got = dataset_to_frame(xr.open_zarr(tmp_path / "m.zarr", group=f"bars/{tf}").load())
    g = df.set_index("time").resample(FREQ[tf])
    want = pd.DataFrame({"open": g.open.first(), "high": g.high.max(), "low": g.low.min(),
                         "close": g.close.last(), "volume": g.volume.sum()}).dropna()
    assert list(got.index.get_level_values("time")) == list(want.index)
    for col in ("open", "high", "low", "close"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    np.testing.assert_allclose(got["volume"].to_numpy(), want["volume"].to_numpy(), rtol=1e-12)
    # Without a trade count in the file each minute bar counts as one.
    assert got["trades"].sum() == len(df)
    assert flow.counters.reconciles() and flow.counters.accepted == 453


def test_daily_file_lands_in_1d_only_with_sp500_values(tmp_path):
    src = DATA / "sp500_daily_ohlcv_2017-10-16_2018-02-07.csv"
    flow = Flow(FlowConfig(store=str(tmp_path / "d.zarr")))
    replay_files(flow, [str(src)], bars="1d")
    flow.close()
    ds = xr.open_zarr(tmp_path / "d.zarr", group="bars/1d").load()
    raw = pd.read_csv(src, parse_dates=["date"])
    assert ds.sizes == {"time": 79, "symbol": 505}
    want = raw.pivot(index="date", columns="Name", values="close")
    got = ds["close"].to_pandas()[want.columns]
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    assert not (tmp_path / "d.zarr" / "bars" / "1m").exists()  # nothing finer than the input


def test_bad_bars_are_quarantined_and_duplicates_counted(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("date,symbol,open,high,low,close,volume\n"
                 "2024-01-02,AAA,10,11,9,10.5,100\n"
                 "2024-01-02,AAA,10,11,9,10.5,100\n"      # the same bar again
                 "2024-01-03,AAA,10,9,9.5,10.5,100\n"     # high below open and close
                 "2024-01-03,BBB,10,11,9,nan,100\n"
                 "2024-01-03,CCC,10,11,9,10,-1\n"
                 "2024-01-04,AAA,11,12,10,11.5,50\n")
    flow = Flow(FlowConfig(store=str(tmp_path / "q.zarr")))
    replay_files(flow, [str(f)], bars="1d")
    flow.close()
    c = flow.counters
    assert (c.received, c.accepted, c.duplicates) == (6, 2, 1)
    assert c.quarantined == {"bad_ohlc": 1, "non_finite_price": 1, "non_positive_size": 1}
    assert c.reconciles()
