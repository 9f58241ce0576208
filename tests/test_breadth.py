"""Breadth and sector figures against an independent pandas computation on the S&P 500 data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.breadth import (
    UNKNOWN_SECTOR,
    BreadthConfig,
    BreadthEngine,
    heatmap_table,
    read_symbols_file,
)

DATA = Path(__file__).parent / "data"
N_HL = 20
SMA = (10, 50)  # SMA 200 is never defined over 79 sessions; 10 and 50 both are
CONFIG = BreadthConfig(high_low_bars=N_HL, sma_periods=SMA)
FIELDS = ("open", "high", "low", "close", "volume")


@pytest.fixture(scope="module")
def sp500() -> pd.DataFrame:
    """Long frame (date, symbol, open..volume, sector, name) sorted by date then symbol."""
    df = pd.read_csv(DATA / "sp500_daily_ohlcv_2017-10-16_2018-02-07.csv", parse_dates=["date"])
    meta = pd.read_csv(DATA / "sp500_constituents_sectors_2018-04-02.csv")
    df = df.rename(columns={"Name": "symbol"}).merge(
        meta.rename(columns={"Symbol": "symbol", "Sector": "sector", "Name": "name"}), on="symbol", how="left")
    df["sector"] = df["sector"].fillna(UNKNOWN_SECTOR)
    df["name"] = df["name"].fillna("")
    return df.sort_values(["date", "symbol"], ignore_index=True)


def wide(df: pd.DataFrame, symbols: list[str] | None = None):
    """Return times (R,), fields (R, S) as the bar engine gives them, and the symbol order."""
    symbols = symbols or sorted(df.symbol.unique())
    dates = np.sort(df.date.unique())
    fields = {}
    for f in FIELDS:
        w = df.pivot(index="date", columns="symbol", values=f).reindex(index=dates, columns=symbols)
        fields[f] = w.to_numpy(dtype=np.float64)
    has = ~np.isnan(fields["close"])
    fields["volume"] = np.where(has, fields["volume"], 0.0)
    fields["trades"] = has.astype(np.int64)
    times = pd.DatetimeIndex(dates).as_unit("ns").asi8
    return times, fields, symbols


def sma_arrays(df: pd.DataFrame, symbols: list[str]) -> dict[int, np.ndarray]:
    """SMAs by pandas rolling over each symbol's own bars, laid out (R, S) like the indicators."""
    g = df.sort_values(["symbol", "date"]).groupby("symbol").close
    dates = np.sort(df.date.unique())
    out = {}
    for n in SMA:
        s = df.sort_values(["symbol", "date"]).assign(sma=g.transform(lambda x, n=n: x.rolling(n).mean()))
        out[n] = s.pivot(index="date", columns="symbol", values="sma").reindex(index=dates, columns=symbols).to_numpy()
    return out


def oracle(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Breadth (by date) and sector figures (date x sector) with pandas only."""
    d = df.sort_values(["symbol", "date"]).copy()
    by = d.groupby("symbol")
    d["prev"] = by.close.shift()  # daily bars: every bar is its own session
    d["adv"], d["dec"], d["unch"] = d.close > d.prev, d.close < d.prev, d.close == d.prev
    d["hh"] = by.high.transform(lambda x: x.rolling(N_HL).max().shift())
    d["ll"] = by.low.transform(lambda x: x.rolling(N_HL).min().shift())
    d["nh"], d["nl"] = d.high > d.hh, d.low < d.ll
    d["upv"] = d.volume.where(d.adv, 0.0)
    d["dnv"] = d.volume.where(d.dec, 0.0)
    for n in SMA:
        d[f"sma{n}"] = by.close.transform(lambda x, n=n: x.rolling(n).mean())
        d[f"valid{n}"] = d[f"sma{n}"].notna()
        d[f"above{n}"] = d.close - d[f"sma{n}"] > 1e-9 * d[f"sma{n}"]  # equal within rounding: not above
    g = d.groupby("date")
    b = pd.DataFrame({
        "advancers": g.adv.sum(), "decliners": g.dec.sum(), "unchanged": g.unch.sum(),
        "new_highs": g.nh.sum(), "new_lows": g.nl.sum(), "up_volume": g.upv.sum(), "down_volume": g.dnv.sum(),
    })
    for n in SMA:
        b[f"pct_above_sma_{n}"] = 100 * g[f"above{n}"].sum() / g[f"valid{n}"].sum().replace(0, np.nan)
    net = b.advancers - b.decliners
    b["ad_line"] = net.cumsum()
    first = (b.advancers + b.decliners + b.unchanged > 0).to_numpy().argmax()
    ema = lambda span: net.iloc[first:].astype(float).ewm(span=span, adjust=False).mean()
    b["mcclellan"] = (ema(19) - ema(39)).reindex(b.index)

    c = d[d.prev.notna()].copy()
    c["ret"] = c.close / c.prev - 1
    c["dollars"] = c.close * c.volume
    c["wret"] = c.ret * c.dollars
    gs = c.groupby(["date", "sector"])
    sectors = {
        "return": gs.ret.mean(),
        "return_vw": gs.wret.sum() / gs.dollars.sum(),
        "advancers": gs.adv.sum(), "decliners": gs.dec.sum(), "unchanged": gs.unch.sum(),
        "volume": d.groupby(["date", "sector"]).volume.sum(),
    }
    return b, {k: v.unstack("sector") for k, v in sectors.items()}


def sectors_of(df: pd.DataFrame, symbols: list[str]) -> list[str]:
    return df.drop_duplicates("symbol").set_index("symbol").sector.reindex(symbols).tolist()


def batch(df: pd.DataFrame, config: BreadthConfig = CONFIG) -> tuple[BreadthEngine, list[str]]:
    times, fields, symbols = wide(df)
    sectors = sectors_of(df, symbols)
    engine = BreadthEngine(config, sectors=sectors)
    engine.update(times, fields, start=0, sma=sma_arrays(df, symbols), forming=False)
    return engine, symbols


def assert_matches_oracle(engine: BreadthEngine, df: pd.DataFrame) -> None:
    b, sec = oracle(df)
    got = engine.breadth()
    assert list(got) == ["advancers", "decliners", "unchanged", "ad_line", "new_highs", "new_lows",
                         *(f"pct_above_sma_{n}" for n in SMA), "up_volume", "down_volume", "mcclellan"]
    for k, v in got.items():
        np.testing.assert_allclose(v, b[k].to_numpy(dtype=float), rtol=1e-12, atol=1e-12, err_msg=k)
    names, values = engine.sectors()
    assert sorted(names) == sorted(df.sector.unique())
    for k, v in values.items():
        expected = sec[k].reindex(index=b.index, columns=names)
        if k in ("advancers", "decliners", "unchanged", "volume"):
            expected = expected.fillna(0)
        np.testing.assert_allclose(v, expected.to_numpy(dtype=float), rtol=1e-12, atol=1e-15, err_msg=k)


def assert_same(a: BreadthEngine, b: BreadthEngine) -> None:
    np.testing.assert_array_equal(a.times, b.times)
    for k, v in a.breadth().items():
        np.testing.assert_allclose(v, b.breadth()[k], rtol=1e-12, atol=1e-12, err_msg=k)
    (na, sa), (nb, sb) = a.sectors(), b.sectors()
    assert na == nb
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-12, atol=1e-15, err_msg=k)


# ---------------------------------------------------------------------------------------------


def test_2018_02_05_two_advancers_503_decliners(sp500):
    engine, _ = batch(sp500)
    row = int(np.searchsorted(engine.times, pd.Timestamp("2018-02-05").value))
    b = engine.breadth()
    assert (b["advancers"][row], b["decliners"][row], b["unchanged"][row]) == (2, 503, 0)


def test_every_breadth_and_sector_column_matches_pandas(sp500):
    engine, _ = batch(sp500)
    assert_matches_oracle(engine, sp500)
    b = engine.breadth()
    assert b["advancers"][0] == b["decliners"][0] == 0  # no previous session close yet
    assert np.isnan(b["mcclellan"][0]) and not np.isnan(b["mcclellan"][1:]).any()
    assert b["new_highs"][:N_HL].sum() == 0 and b["new_highs"][N_HL:].sum() > 0
    names, _ = engine.sectors()
    assert len(names) == 12  # 11 GICS sectors, and "Unknown" for the 7 unmapped tickers
    assert sp500[sp500.sector == UNKNOWN_SECTOR].symbol.nunique() == 7


def test_sma_200_without_history_is_nan(sp500):
    engine, _ = batch(sp500, BreadthConfig())
    b = engine.breadth()
    assert np.isnan(b["pct_above_sma_200"]).all()
    assert np.isnan(b["pct_above_sma_50"][:49]).all() and not np.isnan(b["pct_above_sma_50"][49:]).any()


def test_symbol_without_bar_or_previous_close_is_not_counted(sp500):
    # APTV lists on 2017-12-05: no bar before, no previous session close on its first day.
    engine, symbols = batch(sp500)
    times, fields, _ = wide(sp500)
    aptv, listed = symbols.index("APTV"), int(np.searchsorted(times, pd.Timestamp("2017-12-05").value))
    b = engine.breadth()
    counted = b["advancers"] + b["decliners"] + b["unchanged"]
    assert fields["trades"][listed - 1, aptv] == 0 and counted[listed - 1] == 504
    assert fields["trades"][listed, aptv] == 1 and counted[listed] == 504
    assert counted[listed + 1] == 505


def test_incremental_with_forming_rows_equals_batch(sp500):
    ref, _ = batch(sp500)
    times, fields, symbols = wide(sp500)
    sma = sma_arrays(sp500, symbols)
    rng = np.random.default_rng(3)
    engine = BreadthEngine(CONFIG, sectors=sectors_of(sp500, symbols))
    for r in range(len(times)):
        cut = slice(0, r + 1)
        forming = {k: v[cut].copy() for k, v in fields.items()}
        # The open bar, part-way: fewer symbols traded, other prices and volumes.
        quiet = rng.random(len(symbols)) < 0.5
        forming["trades"][r, quiet] = 0
        for k in FIELDS:
            forming[k][r] *= rng.uniform(0.97, 1.03, len(symbols))
        engine.update(times[cut], forming, start=r, sma={n: a[cut] for n, a in sma.items()}, forming=True)
        engine.update(times[cut], {k: v[cut] for k, v in fields.items()}, start=r,
                      sma={n: a[cut] for n, a in sma.items()}, forming=r == len(times) - 1)
    assert_same(engine, ref)


def test_growing_symbols(sp500):
    # The second half of the tickers lists at row 40: no bars before it.
    times, _, symbols = wide(sp500)
    late = set(symbols[250:])
    df = sp500[~(sp500.symbol.isin(late) & (sp500.date < pd.Timestamp(times[40])))]
    full, _ = batch(df)
    assert_matches_oracle(full, df)
    times, fields, _ = wide(df, symbols)
    sma = sma_arrays(df, symbols)
    sectors = sectors_of(df, symbols)
    engine = BreadthEngine(CONFIG, sectors=sectors[:250])
    for r in range(len(times)):
        S = 250 if r < 40 else len(symbols)
        if r == 45:
            engine.set_sectors(sectors)  # metadata arrives after the symbols: history is regrouped
        cut = slice(0, r + 1)
        engine.update(times[cut], {k: v[cut, :S] for k, v in fields.items()}, start=r,
                      sma={n: a[cut, :S] for n, a in sma.items()})
    assert_same(engine, full)


def test_front_trimming_keeps_history(sp500):
    ref, _ = batch(sp500)
    times, fields, symbols = wide(sp500)
    sma = sma_arrays(sp500, symbols)
    engine = BreadthEngine(CONFIG, sectors=sectors_of(sp500, symbols))
    lo = 0
    for r in range(len(times)):
        if r + 1 - lo > 12:  # drop a chunk from the front, like the bar window does
            lo = r + 1 - 8
        cut = slice(lo, r + 1)
        engine.update(times[cut], {k: v[cut] for k, v in fields.items()}, start=r - lo,
                      sma={n: a[cut] for n, a in sma.items()})
        assert len(engine.times) <= 12
    keep = len(engine.times)
    for k, v in engine.breadth().items():
        np.testing.assert_allclose(v, ref.breadth()[k][-keep:], rtol=1e-12, atol=1e-12, err_msg=k)
    for k, v in engine.sectors()[1].items():
        np.testing.assert_allclose(v, ref.sectors()[1][k][-keep:], rtol=1e-12, atol=1e-15, err_msg=k)


def test_row_inserted_in_the_middle(sp500):
    ref, _ = batch(sp500)
    times, fields, symbols = wide(sp500)
    sma = sma_arrays(sp500, symbols)
    sectors = sectors_of(sp500, symbols)
    engine = BreadthEngine(CONFIG, sectors=sectors)
    gap = np.ones(len(times), bool)
    gap[50] = False  # a bar opened late, between existing rows
    engine.update(times[gap], {k: v[gap] for k, v in fields.items()}, start=0,
                  sma={n: a[gap] for n, a in sma.items()})
    engine.take_changed()
    engine.update(times, fields, start=50, sma=sma)
    assert engine.take_changed() == times[50]
    assert_same(engine, ref)


def test_state_round_trip(sp500, tmp_path):
    ref, _ = batch(sp500)
    times, fields, symbols = wide(sp500)
    sma = sma_arrays(sp500, symbols)
    sectors = sectors_of(sp500, symbols)
    first = BreadthEngine(CONFIG, sectors=sectors)
    first.update(times[:40], {k: v[:40] for k, v in fields.items()}, start=0,
                 sma={n: a[:40] for n, a in sma.items()})
    first.update(times[20:40], {k: v[20:40] for k, v in fields.items()}, start=20,
                 sma={n: a[20:40] for n, a in sma.items()})  # front trimmed: state before the window
    np.savez(tmp_path / "breadth.npz", **first.state())
    second = BreadthEngine(CONFIG)
    with np.load(tmp_path / "breadth.npz") as saved:
        second.restore(dict(saved))
    second.update(times[20:], {k: v[20:] for k, v in fields.items()}, start=20,
                  sma={n: a[20:] for n, a in sma.items()})
    for k, v in second.breadth().items():
        np.testing.assert_allclose(v, ref.breadth()[k][20:], rtol=1e-12, atol=1e-12, err_msg=k)
    with pytest.raises(ValueError, match="another config"):
        BreadthEngine(BreadthConfig(high_low_bars=5)).restore(first.state())


def test_heatmap_table_latest_row(sp500):
    engine, symbols = batch(sp500)
    names = sp500.drop_duplicates("symbol").set_index("symbol").name.reindex(symbols).tolist()
    table = heatmap_table(engine, symbols, names)
    last = sp500[sp500.date == sp500.date.max()].set_index("symbol")
    prev = sp500.sort_values("date").groupby("symbol").close.nth(-2)
    prev.index = sp500.sort_values("date").groupby("symbol").nth(-2).symbol
    assert list(table.columns) == ["symbol", "sector", "name", "return", "volume"]
    assert len(table) == len(last)
    t = table.set_index("symbol")
    np.testing.assert_allclose(t["return"], (last.close / prev.reindex(last.index) - 1).reindex(t.index), rtol=1e-12)
    np.testing.assert_array_equal(t.volume, last.volume.reindex(t.index))
    assert (t.sector == last.sector.reindex(t.index)).all() and (t.name == last.name.reindex(t.index)).all()
    assert t.loc["PCLN", "sector"] == UNKNOWN_SECTOR


def test_intraday_sessions_compare_with_previous_session_close():
    hour = 3_600_000_000_000
    day0 = pd.Timestamp("2024-03-04 14:00").value  # 09:00 New York
    times = np.array([day0, day0 + hour, day0 + 24 * hour, day0 + 25 * hour, day0 + 26 * hour])
    close = np.array([[10.0, 20.0], [11.0, 19.0], [10.5, np.nan], [12.0, 19.0], [10.0, 21.0]])
    trades = (~np.isnan(close)).astype(np.int64)
    fields = {"open": close, "high": close, "low": close, "close": close, "volume": trades * 1.0, "trades": trades}
    engine = BreadthEngine(BreadthConfig(session_tz="America/New_York"), sectors=["A", "A"])
    engine.update(times, fields, start=0)
    b = engine.breadth()
    # Day 1 has no previous session; day 2 compares with day 1's last closes (11, 19).
    assert b["advancers"].tolist() == [0, 0, 0, 1, 1]
    assert b["decliners"].tolist() == [0, 0, 1, 0, 1]
    assert b["unchanged"].tolist() == [0, 0, 0, 1, 0]
    assert b["ad_line"].tolist() == [0, 0, -1, 0, 0]
    # Sessions from 09:30 New York: each 09:00 bar closes the previous day's session.
    late = BreadthEngine(BreadthConfig(session_tz="America/New_York", session_start=pd.Timedelta("9h30min").value))
    late.update(times, fields, start=0)
    assert late.breadth()["advancers"].tolist() == [0, 1, 1, 1, 1]  # X: 10 | 11 10.5 | 12 10
    assert late.breadth()["decliners"].tolist() == [0, 1, 0, 0, 1]  # Y: 20 | 19 -  | 19 21
    table = heatmap_table(engine, ["X", "Y"])
    assert table.set_index("symbol")["return"].round(6).to_dict() == {"X": round(10 / 11 - 1, 6), "Y": round(21 / 19 - 1, 6)}


def test_mcclellan_against_pandas_ewm_seeded_with_first_value():
    rng = np.random.default_rng(0)
    R, S = 120, 40
    close = np.cumprod(1 + rng.normal(0, 0.01, (R, S)), axis=0) * 50
    day = 86_400_000_000_000
    fields = {"open": close, "high": close, "low": close, "close": close, "volume": np.ones((R, S)),
              "trades": np.ones((R, S), np.int64)}
    engine = BreadthEngine()
    engine.update(np.arange(R) * day, fields, start=0)
    b = engine.breadth()
    net = pd.Series(b["advancers"] - b["decliners"], dtype=float).iloc[1:]
    expected = net.ewm(span=19, adjust=False).mean() - net.ewm(span=39, adjust=False).mean()
    np.testing.assert_allclose(b["mcclellan"][1:], expected, rtol=1e-12)
    assert b["mcclellan"][1] == 0.0  # both EMAs start at the first net advances


def test_read_symbols_file():
    meta = read_symbols_file(str(DATA / "sp500_constituents_sectors_2018-04-02.csv"))
    assert meta["MMM"] == {"name": "3M Company", "sector": "Industrials"}


def test_new_sector_column_is_empty_in_earlier_rows():
    day = 86_400_000_000_000
    close = np.array([[10.0], [11.0], [12.0]])
    engine = BreadthEngine(sectors=["Tech"])

    def bars(c):
        return {"open": c, "high": c, "low": c, "close": c, "volume": np.ones_like(c),
                "trades": np.ones(c.shape, np.int64)}

    engine.update(np.arange(2) * day, bars(close[:2]), start=0)
    both = np.hstack([close, [[np.nan], [np.nan], [5.0]]])
    fields = bars(both)
    fields["trades"][:2, 1] = 0
    fields["volume"][:2, 1] = 0
    engine.update(np.arange(3) * day, fields, start=2)  # a symbol without a sector lists
    names, sec = engine.sectors()
    assert names == ["Tech", UNKNOWN_SECTOR]
    np.testing.assert_array_equal(sec["return"][:, 1], [np.nan, np.nan, np.nan])  # no previous close yet
    np.testing.assert_array_equal(sec["volume"][:, 1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(sec["return"][:, 0], [np.nan, 0.1, 12 / 11 - 1])
    engine.set_sectors(["Tech", "Energy"])
    names, sec = engine.sectors()
    assert names == ["Tech", UNKNOWN_SECTOR, "Energy"]  # the sector axis only grows
    np.testing.assert_array_equal(sec["volume"][:, 1:], [[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert engine.take_changed() == 0  # regrouping changes every row


def test_simulated_market_through_bars_incremental_equals_batch():
    """The pipeline's wiring: each batch's touched 1m rows -> breadth, while the bar window trims."""
    from flows.bars import BarConfig, BarEngine
    from flows.breadth import sectors_of
    from flows.feeds.simulated import SimulatedMarket
    from flows.schema import SymbolTable

    table = SymbolTable()
    market = SimulatedMarket(table, n_symbols=30, rate=5.0, seed=5, batch_ms=20_000,
                             start_ns=pd.Timestamp("2024-03-04 23:00", tz="UTC").value)
    short = BarEngine(table, BarConfig(timeframes=("1m",), window=10, history=40))
    full = BarEngine(table, BarConfig(timeframes=("1m",), window=10, history=1000))
    config = BreadthConfig(high_low_bars=5, sma_periods=())
    live = BreadthEngine(config, sectors=sectors_of(table))
    names = ("close", "high", "low", "volume", "trades")
    for batch in market.batches(duration_s=2 * 3600):
        full.update(batch)
        update = short.update(batch)
        if "1m" in update.touched_from:
            ds = short.dataset("1m")
            times = ds.time.values.view(np.int64)
            start = int(np.searchsorted(times, update.touched_from["1m"]))
            live.update(times, {k: ds[k].values for k in names}, start=start)
            short.take_changes("1m")  # as the store does; bars never trim rows not yet taken
    ds = full.dataset("1m")
    batch_engine = BreadthEngine(config, sectors=sectors_of(table))
    batch_engine.update(ds.time.values.view(np.int64), {k: ds[k].values for k in names}, start=0)
    keep = len(live.times)
    assert keep < len(batch_engine.times)  # the window was trimmed at the front
    assert len(set(sectors_of(table))) > 5 and UNKNOWN_SECTOR not in live.sector_names
    np.testing.assert_array_equal(live.times, batch_engine.times[-keep:])
    b = batch_engine.breadth()
    assert (b["advancers"] + b["decliners"]).sum() > 0  # the session rolled over at midnight
    for k, v in live.breadth().items():
        np.testing.assert_allclose(v, b[k][-keep:], rtol=1e-12, atol=1e-12, err_msg=k)
    for k, v in live.sectors()[1].items():
        np.testing.assert_allclose(v, batch_engine.sectors()[1][k][-keep:], rtol=1e-12, atol=1e-15, err_msg=k)
