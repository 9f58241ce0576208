"""Incremental indicators for 500 symbols: microseconds per update, against TA-Lib recomputation.

Run ``python bench/bench_indicators.py``. In one run it prints, for 500 symbols and a 500-bar
in-memory window (the bar engine's default history), the minimum and the median time of one
:meth:`flows.indicators.IndicatorEngine.update` that

* appends one bar (the forming bar closes and a new forming bar opens; rows are trimmed from
  the front a quarter at a time, as ``BarFrame.trim`` does),
* updates the forming bar only (its values change, nothing is committed) -- with every symbol
  moved, and with 10% of them moved (a typical batch),
* rewinds 120 rows (a late trade amends a bar 120 rows back: replay from there),

and the time to recompute the same indicator set with TA-Lib, symbol by symbol, over the
500-bar window -- what a non-incremental pipeline would do after each bar.

The machine is shared: the minimum over many repetitions is the figure to compare, the median
shows the noise, and the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.indicators import IndicatorEngine

MINUTE = 60_000_000_000


def synthetic_bars(rows: int, n_sym: int, seed: int = 3) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random-walk 1m bars; 2% of (row, symbol) cells have no trade."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, (rows, n_sym)), axis=0))
    open_ = np.vstack([close[:1], close[:-1]])
    spread = np.abs(rng.normal(0, 5e-4, (rows, n_sym))) * close
    high, low = np.maximum(open_, close) + spread, np.minimum(open_, close) - spread
    trades = rng.integers(1, 50, (rows, n_sym))
    trades[rng.random((rows, n_sym)) < 0.02] = 0
    empty = trades == 0
    fields = {"open": open_, "high": high, "low": low, "close": close,
              "volume": rng.exponential(100, (rows, n_sym)), "vwap": (high + low + close) / 3,
              "trades": trades.astype(np.int64)}
    for k in ("open", "high", "low", "close", "vwap"):
        fields[k][empty] = np.nan
    fields["volume"][empty] = 0
    return np.arange(rows, dtype=np.int64) * MINUTE, fields


def window(times, fields, lo, hi):
    return times[lo:hi], {k: v[lo:hi] for k, v in fields.items()}


def talib_recompute(fields, lo, hi):
    import talib

    n_sym = fields["close"].shape[1]
    for s in range(n_sym):
        m = fields["trades"][lo:hi, s] > 0
        h, l, c, v = (np.ascontiguousarray(fields[k][lo:hi, s][m]) for k in ("high", "low", "close", "volume"))
        for p in (20, 50, 200):
            talib.SMA(c, p)
        for p in (12, 26, 50):
            talib.EMA(c, p)
        talib.RSI(c, 14)
        talib.MACD(c, 12, 26, 9)
        talib.BBANDS(c, 20, 2, 2, 0)
        talib.STOCH(h, l, c, 14, 3, 0, 3, 0)
        talib.ATR(h, l, c, 14)
        talib.ADX(h, l, c, 14)
        talib.SMA(v, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    S, W, steps = args.symbols, args.window, args.steps
    times, fields = synthetic_bars(W + W // 4 + steps + 1, S)
    engine = IndicatorEngine()
    engine.update(*window(times, fields, 0, W), start=0, forming=True)  # warm up + JIT

    def timed(prepare, n):
        """Min and median us of ``prepare(i)()``, the update alone: ``prepare`` sets up its input."""
        samples = np.empty(n)
        for i in range(n + 1):  # the first call is a warm-up
            update = prepare(i)
            t0 = time.perf_counter()
            update()
            if i:
                samples[i - 1] = time.perf_counter() - t0
        return samples.min() * 1e6, np.median(samples) * 1e6

    lo = 0

    def append(i):  # like BarFrame.trim: W..W+W/4 rows, a quarter dropped at once
        nonlocal lo
        hi = W + i
        if hi - lo > W + W // 4:
            lo = hi - W
        rows, start = window(times, fields, lo, hi), hi - lo - 1
        return lambda: engine.update(*rows, start=start, forming=True)

    load_before = os.getloadavg()
    res = {"append one bar (the forming bar closes)": timed(append, steps - 1)}
    t_now, f_now = window(times, fields, lo, W + steps - 1)
    R = len(t_now)
    f_tick = {k: v.copy() for k, v in f_now.items()}
    rng = np.random.default_rng(0)

    def forming(frac):
        def prepare(i):  # a batch moved the close/volume of ``frac`` of the symbols
            moved = rng.random(S) < frac
            f_tick["close"][-1, moved] *= 1 + 1e-5
            f_tick["volume"][-1, moved] += 1.0
            return lambda: engine.update(t_now, f_tick, start=R - 1, forming=True)
        return prepare

    res["forming bar only, all 500 symbols moved"] = timed(forming(1.0), 5000)
    res["forming bar only, 10% of symbols moved"] = timed(forming(0.1), 5000)
    res["rewind 120 rows (late trade)"] = timed(
        lambda i: lambda: engine.update(t_now, f_tick, start=R - 120, forming=True), 200)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        talib_recompute(fields, lo, W + steps - 1)
    us_talib = (time.perf_counter() - t0) / reps * 1e6
    print(f"indicators, {S} symbols, {W}-bar window (19 variables + vwap_session); min / median us")
    for label, (low, med) in res.items():
        print(f"  IndicatorEngine.update  {label:42s} {low:10.1f} {med:10.1f}")
    print(f"  TA-Lib per symbol, recompute the {R}-bar window          {us_talib:10.1f}")
    print("load average (1, 5, 15 min) before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
        *load_before, *os.getloadavg()))


if __name__ == "__main__":
    main()
