"""Live: the simulated market in real time through the flow, with the store flusher running.

``python bench/bench_live.py [--rate 300000] [--seconds 60] [--batch-ms 10] [--symbols 500]``

The loop is the one ``tapeflow run`` uses (:func:`flows.runner.start_simulated`): the feed
yields a batch when the wall clock reaches the end of its event-time window, and the same
thread pushes it into the flow; the flusher thread persists every ``--flush-interval`` s.

Printed:

* trade-to-open-bar latency: from the moment the feed yields a batch until ``flow.push``
  returns (the open bar holds the batch's trades), weighted per trade -- p50, p99, p99.9, max;
* the offered rate (trades the feed produced per second) and the achieved rate (trades
  through the flow per wall-clock second), and how far the flow fell behind the feed's clock
  (lag: wall clock at the end of a push minus the event-time end of its batch);
* RSS at start (after a warm-up), at the end and its peak; the slope after warm-up;
* flush durations (``flow.stats.flush_ms``) p50 / p99 / max, and where the time went.

The simulated session opens when the run starts, at twice its mean activity; the feed's rate
is scaled down by the mean activity factor over the run so that ``--rate`` is about the rate
actually offered (regime changes can still move it).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.feeds.simulated import SimulatedMarket
from flows.pipeline import Flow, FlowConfig
from flows.schema import NS
from flows.store import writer_dir

OUT = ROOT / "bench" / "out"
SESSION_S = 23_400.0


def open_factor(run_s: float) -> float:
    """Mean of the market's U-shaped activity factor over the first ``run_s`` of a session.

    The simulated session opens at the feed's start (twice the mean activity), so the feed is
    asked for ``rate / open_factor`` to offer about ``rate`` trades/s during the run.
    """
    u = np.linspace(0.0, run_s / SESSION_S, 1001)
    return float(np.mean(1.0 + 1.5 * ((2.0 * u - 1.0) ** 2 - 1.0 / 3.0)))


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs) -> list[float]:
    order = np.argsort(values)
    v, w = values[order], np.cumsum(weights[order])
    return [float(v[min(np.searchsorted(w, q / 100 * w[-1]), len(v) - 1)]) for q in qs]


class RssSampler(threading.Thread):
    def __init__(self, every_s: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.every_s, self.samples = every_s, []
        self._halt = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._halt.wait(self.every_s):
            self.samples.append((time.perf_counter() - t0, self._proc.memory_info().rss / 2**20))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run(rate: float, seconds: float, n_symbols: int, batch_ms: int, flush_interval: float,
        warmup_s: float, store: Path, seed: int = 0, analytics: bool = True,
        quality: bool = True) -> dict:
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(writer_dir(store), ignore_errors=True)
    flow = Flow(FlowConfig(store=None if store is None else str(store),
                           flush_interval_s=flush_interval, feed="simulated",
                           writer="process",  # as `tapeflow serve` and `run` do
                           analytics=analytics, quality=quality))
    start = time.time_ns() // NS * NS
    market = SimulatedMarket(flow.table, n_symbols=n_symbols, rate=rate / open_factor(seconds + warmup_s),
                             seed=seed, start_ns=start, batch_ms=batch_ms, realtime=True,
                             session_s=SESSION_S)
    # Compile the kernels and give the flow its first bars before anything is timed.
    warm = SimulatedMarket(flow.table, n_symbols=n_symbols, rate=1000, seed=seed + 1,
                           start_ns=start - 120 * NS, batch_ms=1000)
    for b in warm.batches(2.0):
        flow.push(b)
    sampler = RssSampler()
    sampler.start()
    flow.start_flusher()
    lat, size, lag, push_at = [], [], [], []
    t_start = time.perf_counter()
    wall_anchor = None
    gen = market.batches(seconds + warmup_s)
    while True:
        try:
            batch = next(gen)
        except StopIteration:
            break
        t0 = time.perf_counter_ns()
        flow.push(batch)
        t1 = time.perf_counter_ns()
        if wall_anchor is None:  # event time of the first batch's end <-> wall clock then
            wall_anchor = (t0, market.start_ns + market.batch_ns)
        lat.append(t1 - t0)
        size.append(len(batch))
        push_at.append(t1)
        # how far behind the feed's clock: the batch should have left at its window's end
        k = len(lat)  # batches so far
        due = wall_anchor[0] + (k - 1) * market.batch_ns
        lag.append(t1 - due)
    wall = time.perf_counter() - t_start
    flow.close()
    sampler.stop()
    lat_a, size_a, lag_a, at = (np.asarray(x, dtype=np.int64) for x in (lat, size, lag, push_at))
    t_rel = (at - at[0]) / NS
    steady = t_rel >= warmup_s
    lat_s, size_s = lat_a[steady], size_a[steady]
    span = t_rel[steady][-1] - t_rel[steady][0] if steady.sum() > 1 else float("nan")
    p50, p99, p999 = weighted_percentiles(lat_s / 1e6, size_s.astype(float), (50, 99, 99.9))
    rss = np.array(sampler.samples) if sampler.samples else np.zeros((1, 2))
    after = rss[rss[:, 0] >= warmup_s] if (rss[:, 0] >= warmup_s).any() else rss
    slope = np.polyfit(after[:, 0], after[:, 1], 1)[0] * 60 if len(after) > 2 else float("nan")
    flush = np.array(flow.stats.flush_ms) if flow.stats.flush_ms else np.array([np.nan])
    return {
        "rate": rate, "batch_ms": batch_ms, "seconds": seconds, "symbols": n_symbols,
        "trades": int(size_s.sum()), "batches": int(steady.sum()),
        "offered_per_s": float(size_s.sum() / (seconds if np.isnan(span) else max(span, 1e-9))),
        "achieved_per_s": float(size_a.sum() / wall),
        "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "max_ms": float(lat_s.max() / 1e6),
        "batch_p50_ms": float(np.percentile(lat_s, 50) / 1e6),
        "lag_end_s": float(lag_a[-1] / NS), "lag_max_s": float(lag_a.max() / NS),
        "rss_start_mb": float(after[0, 1]), "rss_end_mb": float(after[-1, 1]),
        "rss_peak_mb": float(rss[:, 1].max()), "rss_slope_mb_per_min": float(slope),
        "flushes": len(flow.stats.flush_ms),
        "flush_p50_ms": float(np.nanpercentile(flush, 50)),
        "flush_p99_ms": float(np.nanpercentile(flush, 99)), "flush_max_ms": float(np.nanmax(flush)),
        "reconciles": flow.counters.reconciles(), "quarantined": flow.counters.quarantined_total,
    }


def report(r: dict) -> None:
    keep = r["lag_end_s"] < 1.0 and r["achieved_per_s"] >= 0.95 * r["offered_per_s"]
    print(f"rate {r['rate']:,.0f}/s target, {r['symbols']} symbols, batch {r['batch_ms']} ms, "
          f"{r['seconds']:.0f} s measured")
    print(f"  offered   {r['offered_per_s']:>12,.0f} trades/s   ({r['trades']:,} trades, "
          f"{r['batches']:,} batches)")
    print(f"  achieved  {r['achieved_per_s']:>12,.0f} trades/s   keeps up: {'yes' if keep else 'NO'} "
          f"(lag at end {r['lag_end_s']:.3f} s, max {r['lag_max_s']:.3f} s)")
    print(f"  trade-to-open-bar latency (per trade): p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
          f"p99.9 {r['p999_ms']:.2f} ms  max {r['max_ms']:.1f} ms   "
          f"(targets p99 <= 2, p99.9 <= 20)")
    print(f"  RSS: start {r['rss_start_mb']:.0f} MiB, end {r['rss_end_mb']:.0f} MiB, "
          f"peak {r['rss_peak_mb']:.0f} MiB, slope {r['rss_slope_mb_per_min']:+.1f} MiB/min")
    print(f"  flush ({r['flushes']}): p50 {r['flush_p50_ms']:.1f} ms  p99 {r['flush_p99_ms']:.1f} ms  "
          f"max {r['flush_max_ms']:.1f} ms;  reconciles {r['reconciles']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, nargs="+", default=[300_000.0],
                   help="target trades/s; several rates run one after another")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds (600 = the issue's 10 min)")
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--batch-ms", type=int, default=10, help="event time per batch (the feed's default is 100)")
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds run before measuring")
    p.add_argument("--store", default=str(OUT / "live.zarr"))
    p.add_argument("--no-store", action="store_true",
                   help="no store, no flusher: the push cost alone, for comparison")
    p.add_argument("--no-analytics", action="store_true", help="bars only (tapeflow --no-analytics)")
    p.add_argument("--no-quality", action="store_true", help="no quality scoring (tapeflow --no-quality)")
    args = p.parse_args(argv)
    for rate in args.rate:
        report(run(rate, args.seconds, args.symbols, args.batch_ms, args.flush_interval,
                   args.warmup, None if args.no_store else Path(args.store),
                   analytics=not args.no_analytics, quality=not args.no_quality))
    return 0


if __name__ == "__main__":
    sys.exit(main())
