"""Indicators: TA-Lib oracle on real S&P 500 prices, pandas oracle for session VWAP, incremental == batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib

from flows.indicators import _W_OK, IndicatorConfig, IndicatorEngine

DATA = Path(__file__).parent / "data" / "sp500_daily_ohlcv_2017-10-16_2018-02-07.csv"
FIELDS = ("open", "high", "low", "close", "volume", "vwap")
HOUR = 3_600_000_000_000

#: First valid index, in a symbol's own bars, of each default indicator (TA-Lib's lookback).
WARMUP = {"sma_20": 19, "sma_50": 49, "sma_200": 199, "ema_12": 11, "ema_26": 25, "ema_50": 49,
          "rsi_14": 14, "macd": 33, "macd_signal": 33, "macd_hist": 33, "bb_upper": 19,
          "bb_middle": 19, "bb_lower": 19, "stoch_k": 17, "stoch_d": 17, "atr_14": 14,
          "adx_14": 27, "volume_sma_20": 19, "vwap_session": 0}


# -- fixtures ---------------------------------------------------------------------------------


def sp500() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The 505 stocks x 79 sessions as (time x symbol) matrices; a stock absent on a day has no bar."""
    df = pd.read_csv(DATA)
    wide = {c: df.pivot(index="date", columns="Name", values=c) for c in ("open", "high", "low", "close", "volume")}
    times = pd.to_datetime(wide["close"].index).as_unit("ns").asi8
    fields = {k: v.to_numpy(np.float64) for k, v in wide.items()}
    fields["vwap"] = (fields["high"] + fields["low"] + fields["close"]) / 3
    fields["trades"] = np.where(np.isnan(fields["close"]), 0, 1).astype(np.int64)
    fields["volume"] = np.nan_to_num(fields["volume"])
    return times, fields


def punch_holes(fields: dict[str, np.ndarray], frac: float, seed: int) -> dict[str, np.ndarray]:
    """Remove a random fraction of (row, symbol) bars: NaN prices, zero volume and trades."""
    out = {k: v.copy() for k, v in fields.items()}
    hole = np.random.default_rng(seed).random(out["close"].shape) < frac
    for k in FIELDS:
        out[k][hole] = 0.0 if k == "volume" else np.nan
    out["trades"][hole] = 0
    return out


def chained(n_chains: int = 6, per_chain: int = 40) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Long real-price series: each column joins ``per_chain`` stocks end to end, each rescaled so
    its first open equals the previous stock's last close (enough bars for SMA 200)."""
    _, f = sp500()
    full = np.flatnonzero(f["trades"].all(axis=0))
    cols = {k: [] for k in FIELDS}
    for c in range(n_chains):
        parts = {k: [] for k in FIELDS}
        level = 1.0
        for s in full[c * per_chain : (c + 1) * per_chain]:
            scale = level / f["open"][0, s]
            for k in FIELDS:
                parts[k].append(f[k][:, s] * (1.0 if k == "volume" else scale))
            level = parts["close"][-1][-1]
        for k in FIELDS:
            cols[k].append(np.concatenate(parts[k]))
    out = {k: np.column_stack(v) * (1.0 if k == "volume" else 100.0) for k, v in cols.items()}
    out["trades"] = np.ones(out["close"].shape, dtype=np.int64)
    return np.arange(len(out["close"]), dtype=np.int64) * 86_400_000_000_000, out


def talib_expected(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TA-Lib over each symbol's non-empty bars, placed back at those rows (NaN elsewhere)."""
    shape = fields["close"].shape
    want = {name: np.full(shape, np.nan) for name in WARMUP if name != "vwap_session"}
    for s in range(shape[1]):
        m = fields["trades"][:, s] > 0
        h, l, c, v = (np.ascontiguousarray(fields[k][m, s]) for k in ("high", "low", "close", "volume"))
        got = {f"sma_{p}": talib.SMA(c, p) for p in (20, 50, 200)}
        got |= {f"ema_{p}": talib.EMA(c, p) for p in (12, 26, 50)}
        got["rsi_14"] = talib.RSI(c, 14)
        got["macd"], got["macd_signal"], got["macd_hist"] = talib.MACD(c, 12, 26, 9)
        got["bb_upper"], got["bb_middle"], got["bb_lower"] = talib.BBANDS(c, 20, 2, 2, 0)
        got["stoch_k"], got["stoch_d"] = talib.STOCH(h, l, c, 14, 3, 0, 3, 0)
        got["atr_14"] = talib.ATR(h, l, c, 14)
        got["adx_14"] = talib.ADX(h, l, c, 14)
        got["volume_sma_20"] = talib.SMA(v, 20)
        for name, values in got.items():
            want[name][m, s] = values
    return want


def batch(times, fields, forming=False, config=None) -> dict[str, np.ndarray]:
    engine = IndicatorEngine(config)
    engine.update(times, fields, start=0, forming=forming)
    return {k: v.copy() for k, v in engine.outputs().items()}


def rows(fields, stop, start=0, n_sym=None):
    return {k: v[start:stop, :n_sym] for k, v in fields.items()}


def assert_outputs_equal(got, want, rows_=slice(None)):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name][rows_], err_msg=name)


# -- TA-Lib and pandas oracles ----------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["sp500", "sp500_holes", "chained_holes"])
def test_every_indicator_equals_talib_over_each_symbols_own_bars(dataset):
    # Arrange: real prices; with holes, each symbol's series skips the rows it has no bar in.
    times, fields = chained() if dataset.startswith("chained") else sp500()
    if dataset.endswith("holes"):
        fields = punch_holes(fields, 0.08, seed=5)
    # Act
    got = batch(times, fields)
    want = talib_expected(fields)
    # Assert: equal within 1e-9 from each warm-up on, NaN exactly where TA-Lib is NaN
    for name, values in want.items():
        np.testing.assert_allclose(got[name], values, rtol=0, atol=1e-9, equal_nan=True, err_msg=name)
        # 79 sessions are too few for SMA 200; the chained series cover it
        assert np.isfinite(values).any() or name == "sma_200" and dataset.startswith("sp500"), name
    no_bar = fields["trades"] == 0
    assert all(np.isnan(got[name][no_bar]).all() for name in WARMUP)


def test_warmups_are_talib_lookbacks():
    times, fields = chained(n_chains=1)
    got = batch(times, fields)
    first = {name: int(np.flatnonzero(np.isfinite(got[name][:, 0]))[0]) for name in WARMUP}
    assert first == WARMUP


def intraday(n_sym=12, days=3, seed=11) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Hourly bars around the clock for a few days (sessions cross UTC midnight), with holes."""
    rng = np.random.default_rng(seed)
    t0 = pd.Timestamp("2024-03-08 13:00", tz="UTC").value  # spans the US DST change of 2024-03-10
    times = t0 + np.arange(24 * days, dtype=np.int64) * HOUR
    close = 50 * np.exp(np.cumsum(rng.normal(0, 0.01, (len(times), n_sym)), axis=0))
    fields = {"open": close * 0.999, "high": close * 1.002, "low": close * 0.997, "close": close,
              "volume": rng.exponential(1000, close.shape), "vwap": close * (1 + rng.normal(0, 1e-3, close.shape)),
              "trades": rng.integers(1, 30, close.shape).astype(np.int64)}
    return times, punch_holes(fields, 0.2, seed)


@pytest.mark.parametrize("tz", [None, "America/New_York"])
def test_vwap_session_equals_pandas_cumulative_vwap_per_session(tz):
    # Arrange
    times, fields = intraday()
    config = IndicatorConfig(session_tz=tz, session_start=0 if tz is None else 4 * HOUR)
    # Act
    got = batch(times, fields, config=config)["vwap_session"]
    # Assert: pandas, symbol by symbol over its non-empty bars, grouped by session day
    idx = pd.DatetimeIndex(times.view("datetime64[ns]"), tz="UTC")
    local = idx if tz is None else idx.tz_convert(tz).tz_localize(None) - pd.Timedelta(hours=4)
    frame = pd.DataFrame({"day": np.repeat(local.floor("D").asi8, fields["close"].shape[1]),
                          "symbol": np.tile(np.arange(fields["close"].shape[1]), len(times)),
                          "pv": (fields["vwap"] * fields["volume"]).ravel(),
                          "v": fields["volume"].ravel(), "traded": fields["trades"].ravel() > 0})
    traded = frame[frame.traded]
    keys = [traded.symbol, traded.day]
    want = np.full(frame.shape[0], np.nan)
    want[traded.index] = traded.pv.groupby(keys).cumsum() / traded.v.groupby(keys).cumsum()
    np.testing.assert_allclose(got.ravel(), want, rtol=0, atol=1e-9, equal_nan=True)


# -- incremental == batch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def holed():
    times, fields = sp500()
    return times, rows(punch_holes(fields, 0.1, seed=2), None, n_sym=60)


def forming_versions(fields, r, k=3):
    """Row ``r`` as it grows: ``k`` partial bars (fewer trades seen), then the final one."""
    out = []
    for frac in np.linspace(0.3, 1.0, k + 1):
        f = {key: v[: r + 1].copy() for key, v in fields.items()}
        o, c = fields["open"][r], fields["close"][r]
        part = o + frac * (c - o)
        f["close"][r] = part
        f["high"][r] = np.minimum(fields["high"][r], np.maximum(o, part) + frac)
        f["low"][r] = np.maximum(fields["low"][r], np.minimum(o, part) - frac)
        f["volume"][r] = fields["volume"][r] * frac
        f["vwap"][r] = (f["high"][r] + f["low"][r] + part) / 3
        out.append(f)
    out[-1] = {key: v[: r + 1] for key, v in fields.items()}
    return out


def test_incremental_row_by_row_with_a_forming_bar_equals_batch(holed):
    times, fields = holed
    engine = IndicatorEngine()
    for r in range(len(times)):
        for f in forming_versions(fields, r):
            engine.update(times[: r + 1], f, start=r, forming=True)
            assert_outputs_equal(engine.outputs(), batch(times[: r + 1], f, forming=True))
    engine.update(times, fields, start=len(times), forming=False)  # the last bar closes
    assert_outputs_equal(engine.outputs(), batch(times, fields))


def test_late_amendments_to_older_rows_replay_exactly(holed):
    times, fields = holed
    fields = {k: v.copy() for k, v in fields.items()}
    rng = np.random.default_rng(4)
    engine = IndicatorEngine()
    engine.update(times[:20], rows(fields, 20), start=0, forming=True)
    for r in range(20, len(times)):
        engine.update(times[: r + 1], rows(fields, r + 1), start=r - 1, forming=True)
        if r % 3 == 0:  # a late trade amends a bar up to 40 rows back (or opens one in a hole)
            row, sym = int(rng.integers(max(0, r - 40), r)), int(rng.integers(0, 60))
            price = fields["close"][row - 1, sym] if row and fields["trades"][row - 1, sym] else 100.0
            if fields["trades"][row, sym] == 0:
                for k in ("open", "high", "low", "close", "vwap"):
                    fields[k][row, sym] = price
            fields["close"][row, sym] = price * 1.01
            fields["high"][row, sym] = max(fields["high"][row, sym], price * 1.01)
            fields["volume"][row, sym] += 500.0
            fields["trades"][row, sym] += 1
            engine.update(times[: r + 1], rows(fields, r + 1), start=row, forming=True)
            assert engine.changed_from == row
        assert_outputs_equal(engine.outputs(), batch(times[: r + 1], rows(fields, r + 1), forming=True))


def test_front_trimming_keeps_state_by_bar_time(holed):
    # Arrange: the bar engine keeps only the last 25 rows in memory
    times, fields = holed
    engine = IndicatorEngine()
    full = batch(times, fields, forming=True)
    # Act
    for r in range(len(times)):
        lo = max(0, r + 1 - 25)
        engine.update(times[lo : r + 1], rows(fields, r + 1, lo), start=r - lo, forming=True)
    # Assert: the retained rows equal the batch over the whole history
    assert_outputs_equal(engine.outputs(), full, slice(len(times) - 25, None))


def test_a_row_inserted_in_the_middle_is_replayed_from(holed):
    times, fields = holed
    keep = np.ones(len(times), bool)
    keep[50] = False  # nobody traded at row 50 ... until a late trade opens that bar
    engine = IndicatorEngine()
    engine.update(times[keep][:70], rows({k: v[keep] for k, v in fields.items()}, 70), start=0, forming=True)
    engine.update(times[:71], rows(fields, 71), start=50, forming=True)
    assert_outputs_equal(engine.outputs(), batch(times[:71], rows(fields, 71), forming=True))


def test_symbols_appended_between_updates(holed):
    times, fields = holed
    fields = {k: v.copy() for k, v in fields.items()}
    for k in FIELDS:  # symbols 40.. list at row 30
        fields[k][:30, 40:] = 0.0 if k == "volume" else np.nan
    fields["trades"][:30, 40:] = 0
    engine = IndicatorEngine()
    for r in range(len(times)):
        engine.update(times[: r + 1], rows(fields, r + 1, n_sym=40 if r < 30 else 60), start=r, forming=True)
    assert_outputs_equal(engine.outputs(), batch(times, fields, forming=True))


#: Short periods, so that most of the 79 sessions are past every warm-up.
SHORT = IndicatorConfig(sma=(5, 10, 30), ema=(5, 10, 20), rsi=5, macd=(4, 9, 3), bbands=(10, 2.0),
                        stoch=(5, 3, 3), atr=5, adx=5, volume_sma=10)


def growing_bar(fields, r, rng, k=4):
    """Yield row ``r`` of ``fields`` (modified in place) as its trades arrive, ending with the
    real bar: each stock's first trade comes at a random step; until the last step its bar is
    partial (close within the final range, part of the volume), with now and then a zero low."""
    final = {key: v[r].copy() for key, v in fields.items()}
    first = rng.integers(0, k, len(final["close"]))
    for step in range(k - 1):
        part = (step + 1) / k
        close = final["low"] + rng.random(len(first)) * (final["high"] - final["low"])
        fields["close"][r] = close
        fields["high"][r] = np.maximum(final["open"], close)
        fields["low"][r] = np.where(rng.random(len(first)) < 0.01, 0.0, np.minimum(final["open"], close))
        fields["volume"][r] = final["volume"] * part
        fields["vwap"][r] = (fields["high"][r] + fields["low"][r] + close) / 3
        fields["trades"][r] = np.maximum(1, final["trades"])
        absent = (first > step) | (final["trades"] == 0)
        for key in FIELDS:
            fields[key][r, absent] = 0.0 if key == "volume" else np.nan
        fields["trades"][r, absent] = 0
        yield
    for key, v in final.items():
        fields[key][r] = v
    yield


@pytest.mark.parametrize("config", [None, SHORT], ids=["default", "short"])
def test_the_forming_row_fast_path_equals_the_general_path(config):
    # Arrange: every stock, with holes. The forming row goes through the kernel vectorized across
    # symbols; ``general`` gets the same rows closed, so it computes each one symbol by symbol.
    times, fields = sp500()
    fields = punch_holes(fields, 0.08, seed=9)
    rng = np.random.default_rng(1)
    fast, general = IndicatorEngine(config), IndicatorEngine(config)
    for r in range(len(times)):
        for _ in growing_bar(fields, r, rng):
            # Act
            fast.update(times[: r + 1], rows(fields, r + 1), start=r, forming=True)
            general.update(times[: r + 1], rows(fields, r + 1), start=r, forming=False)
            # Assert: the same bits, the forming row included
            got, want = fast.outputs(), general.outputs()
            for name in fast.names:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} row {r}")
    fast.update(times, fields, start=len(times), forming=False)  # the last bar closes unchanged
    for key, value in general.state().items():
        np.testing.assert_array_equal(fast.state()[key], value, err_msg=key)
    # most stocks went through the vectorized kernel, not its per-symbol fallback
    assert (fast._work[_W_OK, : fields["close"].shape[1]] == 1.0).mean() > 0.9


def test_state_restore_resumes_exactly(holed):
    # Arrange: run to row 50, checkpoint, restart in a fresh engine
    times, fields = holed
    engine = IndicatorEngine(IndicatorConfig(max_rewind=60))
    for r in range(50):
        engine.update(times[: r + 1], rows(fields, r + 1), start=r, forming=True)
    saved = {k: v.copy() for k, v in engine.state().items()}
    resumed = IndicatorEngine(IndicatorConfig(max_rewind=60))
    resumed.restore(saved)
    # Act: both continue, including a replay from 30 rows back
    start = resumed.pending_from(times[:50])
    assert start == 49
    for eng in (engine, resumed):
        eng.update(times[:50], rows(fields, 50), start=start, forming=True)
        for r in range(50, len(times)):
            eng.update(times[: r + 1], rows(fields, r + 1), start=r, forming=True)
        eng.update(times, fields, start=len(times) - 30, forming=True)
    # Assert
    assert_outputs_equal(resumed.outputs(), engine.outputs())
    assert_outputs_equal(resumed.outputs(), batch(times, fields, forming=True))
    with pytest.raises(ValueError, match="different IndicatorConfig"):
        IndicatorEngine().restore(saved)


def test_replay_beyond_max_rewind_is_refused(holed):
    times, fields = holed
    engine = IndicatorEngine(IndicatorConfig(max_rewind=10))
    engine.update(times[:40], rows(fields, 40), start=0, forming=True)
    engine.update(times[:40], rows(fields, 40), start=30, forming=True)  # 9 closed rows back: fine
    with pytest.raises(ValueError, match="max_rewind"):
        engine.update(times[:40], rows(fields, 40), start=25, forming=True)


def test_only_the_forming_row_is_provisional(holed):
    times, fields = holed
    engine = IndicatorEngine()
    engine.update(times[:10], rows(fields, 10), start=0, forming=True)
    assert engine.outputs()["provisional"].tolist() == [False] * 9 + [True]
    engine.update(times[:10], rows(fields, 10), start=10, forming=False)
    assert not engine.outputs()["provisional"].any()
    assert engine.changed_from == 9


def test_config_names_follow_periods_and_validate():
    assert IndicatorConfig().names == tuple(WARMUP)
    assert "sma_10" in IndicatorConfig(sma=(10,)).names
    with pytest.raises(ValueError):
        IndicatorConfig(macd=(26, 12, 9))
    with pytest.raises(ValueError):
        IndicatorConfig(rsi=1)
