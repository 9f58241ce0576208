"""Independent reference implementations the tests compare the flow against (pandas, plain Python)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from flows.schema import BAR_FIELDS, NS, TIMEFRAMES

FREQ = {"1m": "1min", "5m": "5min", "15m": "15min", "1h": "1h", "4h": "4h", "1d": "1D"}


def adversarial_trades(seed: int = 7, n: int = 6000, window_min: int = 30) -> pd.DataFrame:
    """Trades in arrival order with everything a venue throws at a flow.

    Out-of-order arrival within ``window_min`` minutes, a handful of far-too-late trades,
    duplicates (same symbol and trade_id, resent later), invalid ticks (NaN/zero/negative
    price, zero size), a nearly silent symbol, a gap hour with no trades at all, and a UTC
    midnight crossing. Equal timestamps are common (ties are broken by trade id, then arrival).
    """
    rng = np.random.default_rng(seed)
    symbols = np.array(["AAA", "BBB", "CCC", "DDD", "QUIET"])
    start = pd.Timestamp("2024-03-01 21:50", tz="UTC").value
    # Event times over ~5 h, skipping 23:10-00:10 (the gap hour), on a coarse 250 ms grid so ties occur.
    t = start + (rng.integers(0, 5 * 3600 * 4, n) * (NS // 4))
    gap0, gap1 = pd.Timestamp("2024-03-01 23:10", tz="UTC").value, pd.Timestamp("2024-03-02 00:10", tz="UTC").value
    t = np.where((t >= gap0) & (t < gap1), t + (gap1 - gap0), t)
    sym = rng.choice(symbols[:4], n)
    quiet = rng.choice(n, 6, replace=False)
    sym[quiet] = "QUIET"
    order = np.argsort(t, kind="stable")
    t, sym = t[order], sym[order]
    trade_id = np.zeros(n, dtype=np.int64)
    for s in symbols:  # ids increase with event time per symbol, like a venue's
        m = sym == s
        trade_id[m] = 1000 + np.arange(m.sum())
    price = np.round(100 + np.cumsum(rng.normal(0, 0.05, n)), 2)
    size = np.round(rng.exponential(10, n), 3) + 0.001
    df = pd.DataFrame({"time": t, "symbol": sym, "price": price, "size": size, "trade_id": trade_id})
    # Arrival order: event order plus a random delay of up to window_min/2 minutes.
    delay = rng.integers(0, window_min * 60 // 2, n) * NS
    delay[rng.choice(n, 5, replace=False)] = 3 * 3600 * NS  # hopelessly late
    df["arrive"] = df.time + delay
    dups = df.sample(60, random_state=seed).assign(arrive=lambda d: d.arrive + rng.integers(1, 600, 60) * NS)
    bad = df.sample(40, random_state=seed + 1).copy()
    bad["price"] = np.resize([np.nan, 0.0, -1.0, np.inf, 5.0], 40)
    bad["size"] = np.where(bad.price == 5.0, 0.0, bad["size"])
    bad["trade_id"] = 900_000 + np.arange(40)
    df = pd.concat([df, dups, bad], ignore_index=True)
    return df.sort_values("arrive", kind="stable").reset_index(drop=True).drop(columns="arrive")


def accepted_trades(df: pd.DataFrame, window_min: int) -> tuple[pd.DataFrame, dict]:
    """Apply the contract by hand, trade by trade in arrival order: valid, first of each id, not too late."""
    counts = {"invalid": 0, "duplicates": 0, "too_late": 0}
    seen: set = set()
    open_minute = None
    keep = []
    for i, row in enumerate(df.itertuples(index=False)):
        if not (np.isfinite(row.price) and row.price > 0 and np.isfinite(row.size) and row.size > 0):
            counts["invalid"] += 1
            continue
        key = (row.symbol, row.trade_id)
        if row.trade_id >= 0 and key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        minute = row.time - row.time % (60 * NS)
        if open_minute is not None and minute < open_minute - (window_min - 1) * 60 * NS:
            counts["too_late"] += 1
            continue
        open_minute = minute if open_minute is None else max(open_minute, minute)
        keep.append(i)
    out = df.iloc[keep].copy()
    out["arrival"] = np.arange(len(out))
    return out, counts


def pandas_bars(trades: pd.DataFrame, tf: str) -> pd.DataFrame:
    """Aggregate trades into bars: floor to the timeframe, order by (time, trade_id, arrival),
    then first/max/min/last/sum/count/vwap. Returns a frame indexed by (time, symbol)."""
    t = trades.sort_values(["time", "trade_id", "arrival"], kind="stable").copy()
    t["bucket"] = pd.to_datetime(t.time, unit="ns").dt.floor(FREQ[tf])
    t["pv"] = t.price * t["size"]
    g = t.groupby(["bucket", "symbol"])
    out = pd.DataFrame({
        "open": g.price.first(), "high": g.price.max(), "low": g.price.min(), "close": g.price.last(),
        "volume": g["size"].sum(), "trades": g.price.count().astype("int64"),
    })
    out["vwap"] = g.pv.sum() / out.volume
    out.index.names = ["time", "symbol"]
    return out[list(BAR_FIELDS)]


def rollup(bars_1m: pd.DataFrame, tf: str) -> pd.DataFrame:
    """Roll 1m bars (indexed by time, symbol) up to ``tf`` with pandas resample."""
    b = bars_1m.reset_index()
    b["pv"] = b.vwap * b.volume
    g = b.set_index("time").groupby("symbol").resample(FREQ[tf])
    out = pd.DataFrame({"open": g.open.first(), "high": g.high.max(), "low": g.low.min(),
                        "close": g.close.last(), "volume": g.volume.sum(), "trades": g.trades.sum(),
                        "pv": g.pv.sum()})
    out = out[out.trades > 0].swaplevel().sort_index()
    out["vwap"] = out.pop("pv") / out.volume
    out.index.names = ["time", "symbol"]
    out["trades"] = out.trades.astype("int64")
    return out[list(BAR_FIELDS)]


def dataset_to_frame(ds) -> pd.DataFrame:
    """Non-empty bars of a (time, symbol) Dataset as a frame indexed by (time, symbol)."""
    df = ds[list(BAR_FIELDS)].to_dataframe()
    df = df[df.trades > 0]
    return df.sort_index()


def assert_bars_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """OHLC, trade counts and keys exactly; volume and vwap to float64 summation rounding."""
    assert list(got.index) == list(want.index), f"bar keys differ: {len(got)} vs {len(want)} rows"
    for col in ("open", "high", "low", "close", "trades"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    for col in ("volume", "vwap"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-12, err_msg=col)


__all__ = ["TIMEFRAMES", "adversarial_trades", "accepted_trades", "pandas_bars", "rollup",
           "dataset_to_frame", "assert_bars_equal"]
