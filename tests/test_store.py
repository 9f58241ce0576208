"""Store: stored bars equal the oracle, restart resumes exactly, readers never fail, one writer."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flows.pipeline import Flow, FlowConfig
from flows.schema import TIMEFRAMES, TradeBatch
from flows.store import BarStore, StoreLockedError, open_bars
from tests.oracle import (accepted_trades, adversarial_trades, assert_bars_equal, dataset_to_frame,
                          pandas_bars)

WINDOW = 30


def push_frame(flow: Flow, df: pd.DataFrame, cuts, flush_every: int | None = None) -> None:
    bounds = [0, *sorted(set(cuts)), len(df)]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a >= b:
            continue
        part = df.iloc[a:b]
        flow.push(TradeBatch.from_columns(flow.table, time=part.time.to_numpy(), symbol=part.symbol.to_numpy(),
                                          price=part.price.to_numpy(), size=part["size"].to_numpy(),
                                          trade_id=part.trade_id.to_numpy()))
        if flush_every and i % flush_every == 0:
            flow.flush()


def make_flow(path, history=100) -> Flow:
    # Bars only: analytics have their own tests (tests/test_analytics_flow.py).
    return Flow(FlowConfig(store=str(path), window=WINDOW, history=history, analytics=False),
                clock=lambda: 2**62)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "market.zarr"
    df = adversarial_trades(seed=11)
    flow = make_flow(path)
    push_frame(flow, df, list(np.random.default_rng(2).integers(0, len(df), 60)), flush_every=3)
    flow.close()
    return path, df, flow


@pytest.mark.parametrize("tf", list(TIMEFRAMES))
def test_stored_bars_equal_pandas_oracle(stored, tf):
    # The in-memory window (history=100 rows) is far shorter than the tape: the store must hold
    # every bar, amended in place by late trades across many flushes.
    path, df, _ = stored
    want, _ = accepted_trades(df, WINDOW)
    got = dataset_to_frame(xr.open_zarr(path, group=f"bars/{tf}").load())
    assert_bars_equal(got, pandas_bars(want, tf))


def test_stored_layout_and_dtypes(stored):
    path, _, _ = stored
    ds = open_bars(path, "1m")
    assert ds["time"].dtype == np.dtype("datetime64[ns]")
    assert list(ds.dims) == ["time", "symbol"] or set(ds.dims) == {"time", "symbol"}
    assert {n: str(ds[n].dtype) for n in ds.data_vars} == {
        "open": "float64", "high": "float64", "low": "float64", "close": "float64",
        "volume": "float64", "trades": "int64", "vwap": "float64"}
    assert ds.indexes["time"].is_monotonic_increasing and ds.indexes["time"].is_unique
    empty = ds["trades"].values == 0
    assert np.isnan(ds["open"].values[empty]).all() and (ds["volume"].values[empty] == 0).all()
    import zarr
    assert zarr.open_array(str(path / "bars/1m/time"), mode="r").dtype == np.dtype("int64")


def test_quarantine_is_persisted_with_reasons(stored):
    path, _, flow = stored
    q = xr.open_zarr(path, group="quarantine").load()
    counts = pd.Series(q.reason.values.tolist()).value_counts().to_dict()
    assert counts == flow.counters.quarantined
    assert "too_late" in counts and "non_positive_price" in counts


def test_restart_mid_replay_ends_identical_to_uninterrupted(tmp_path):
    df = adversarial_trades(seed=5, n=4000)
    cuts = list(range(0, len(df), 150))
    whole = make_flow(tmp_path / "whole.zarr")
    push_frame(whole, df, cuts, flush_every=2)
    whole.close()
    # Stop part-way (after a flush, as a killed process leaves it), reopen, push the rest.
    first = make_flow(tmp_path / "resumed.zarr")
    push_frame(first, df.iloc[:2100], [c for c in cuts if c < 2100], flush_every=2)
    first.flush()
    first.store.close()  # no final close(): like a process that died after its last flush
    second = make_flow(tmp_path / "resumed.zarr")
    assert second.resumed
    push_frame(second, df.iloc[2100:], [c - 2100 for c in cuts if c > 2100], flush_every=2)
    second.close()
    for tf in TIMEFRAMES:
        a = dataset_to_frame(open_bars(tmp_path / "whole.zarr", tf).load())
        b = dataset_to_frame(open_bars(tmp_path / "resumed.zarr", tf).load())
        assert_bars_equal(b, a)
    assert second.counters.to_dict() == whole.counters.to_dict()


def test_second_writer_is_refused(tmp_path):
    flow = make_flow(tmp_path / "m.zarr")
    with pytest.raises(StoreLockedError, match="being written by tapeflow pid"):
        BarStore(tmp_path / "m.zarr", ("1m",), flow.table)
    flow.close()
    BarStore(tmp_path / "m.zarr", ("1m",), flow.table).close()  # free again after close


READER = textwrap.dedent("""
    import os, sys, xarray as xr
    path, stop = sys.argv[1], sys.argv[2]
    opened = 0
    while not os.path.exists(stop):
        for tf in ("1m", "1h"):
            try:
                ds = xr.open_zarr(path, group=f"bars/{tf}")
            except FileNotFoundError:
                continue  # not created yet
            assert ds.sizes["time"] == ds["time"].size
            ds["close"].isel(time=slice(-3, None)).load()
            opened += 1
    print(opened)
""")


@pytest.mark.slow
def test_reader_process_never_fails_during_writes(tmp_path):
    # Arrange: a reader process opening the groups in a loop.
    path, stop = tmp_path / "live.zarr", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Act: 80 flushes, each after 20 s of event time, so rows are appended (and the forming
    # bars patched) while the reader reads.
    from flows.feeds.simulated import SimulatedMarket

    flow = Flow(FlowConfig(store=str(path), analytics=False))
    market = SimulatedMarket(flow.table, n_symbols=50, rate=500, start_ns=1_700_000_000 * 10**9,
                             batch_ms=20_000)
    for batch in market.batches(80 * 20):
        flow.push(batch)
        flow.flush()
    stop.touch()
    out, err = reader.communicate(timeout=60)
    flow.close()
    # Assert
    assert reader.returncode == 0, err[-2000:]
    assert int(out) > 20
    assert open_bars(path, "1m").sizes["time"] in (27, 28)  # 1600 s from :20 past the minute


def test_restart_gives_the_rolling_window_its_history_back(tmp_path):
    df = adversarial_trades(seed=8, n=3000)
    first = make_flow(tmp_path / "h.zarr", history=100)
    push_frame(first, df, list(range(0, len(df), 200)), flush_every=1)
    first.close()
    stored = dataset_to_frame(open_bars(tmp_path / "h.zarr", "1m").load())
    want = first.engine.dataset("1m", last=100)
    second = make_flow(tmp_path / "h.zarr", history=100)
    got = second.engine.dataset("1m")
    # The last `history` bars, as before the stop (restored window + preloaded older rows).
    assert got.sizes["time"] == 100
    assert_bars_equal(dataset_to_frame(got), dataset_to_frame(want))
    second.close()
    # A restart that receives nothing leaves the store as it was.
    assert_bars_equal(dataset_to_frame(open_bars(tmp_path / "h.zarr", "1m").load()), stored)


def test_direct_group_creation_matches_xarray_to_zarr(tmp_path):
    # The writer creates groups itself (concurrently); it must be what xarray would write.
    import json

    import zarr
    from zarr.core.sync import sync

    from flows.bars import make_bars_dataset
    from flows.store import _create_group, rows_encoding

    rng = np.random.default_rng(0)
    times = np.arange(70, dtype=np.int64) * 60_000_000_000 + 1_700_000_000_000_000_000
    values = {k: rng.random((70, 3)) for k in ("open", "high", "low", "close", "volume", "vwap")}
    values["trades"] = rng.integers(0, 5, (70, 3))
    ds = make_bars_dataset(times, ["A", "BB", "CCC"], values)
    ds["provisional"] = ("time", np.arange(70) == 69)
    ds.to_zarr(tmp_path / "x.zarr", group="g", mode="w", zarr_format=3, consolidated=False,
               encoding=rows_encoding(ds))
    zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    sync(_create_group(str(tmp_path / "d.zarr" / "g"), ds))
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "d.zarr", group="g", consolidated=False).load(),
                                xr.open_zarr(tmp_path / "x.zarr", group="g", consolidated=False).load())
    for name in ds.variables:
        meta = [json.loads((tmp_path / s / "g" / name / "zarr.json").read_text()) for s in ("x.zarr", "d.zarr")]
        assert meta[0] == meta[1], name
