"""Flush latency at 500 symbols with all six timeframes, split into its parts.

``python bench/bench_flush.py [--symbols 500] [--flushes 600] [--rate 50000]``

The simulated market runs as fast as possible; after every ``--every-s`` seconds of event time
(1 s, the live flush interval) the store is flushed, timing the same steps as
:meth:`flows.pipeline.Flow.flush`:

* snapshot -- under the flow lock: ``take_changes`` of every timeframe and the checkpoint state
  (this is the part that blocks the hot path);
* bars/{tf} -- ``BarStore.write_bars`` per timeframe (a patch of the open bar's chunks, or a
  resize + append + metadata publish when a new bar opened);
* quarantine + symbol meta + publish, then checkpoint (``save_checkpoint``).

Flushes whose 1m write appended a row (a new minute) are reported apart from those that only
patched the open bar: the p99 is made of the former.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.feeds.simulated import SimulatedMarket
from flows.pipeline import Flow, FlowConfig
from flows.schema import NS, Quarantine
from flows.store import writer_dir

OUT = ROOT / "bench" / "out"


def timed_flush(flow: Flow) -> dict[str, float]:
    """Flow.flush, step by step (kept in step with flows/pipeline.py); ms per step."""
    ms: dict[str, float] = {}
    t0 = time.perf_counter()
    with flow.lock:
        changes = {tf: flow.engine.take_changes(tf) for tf in flow.engine.frames}
        t1 = time.perf_counter()
        quarantine = Quarantine.concat(flow._pending_quarantine)
        flow._pending_quarantine = []
        arrays, meta = flow._checkpoint_state()
    t2 = time.perf_counter()
    ms["snap: take_changes"] = (t1 - t0) * 1e3
    ms["snap: checkpoint state"] = (t2 - t1) * 1e3
    ms["snapshot (under lock)"] = (t2 - t0) * 1e3
    store = flow.store
    t = time.perf_counter()
    store.write_symbol_meta()
    ms["symbol meta"] = (time.perf_counter() - t) * 1e3
    for tf, ds in changes.items():
        t = time.perf_counter()
        store.write_bars(tf, ds)
        ms[f"bars/{tf}"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    store.write_quarantine(quarantine)
    store.publish()
    ms["quarantine + publish"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    store.save_checkpoint(arrays, meta)
    ms["checkpoint (npz)"] = (time.perf_counter() - t) * 1e3
    ms["total"] = (time.perf_counter() - t0) * 1e3
    return ms


def run(n_symbols: int, flushes: int, rate: float, every_s: float, store: Path) -> tuple[list, list]:
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(writer_dir(store), ignore_errors=True)
    flow = Flow(FlowConfig(store=str(store), writer="process"))
    start = (time.time_ns() // NS - flushes * int(every_s) - 3600) // 60 * 60 * NS
    market = SimulatedMarket(flow.table, n_symbols=n_symbols, rate=rate, seed=0, start_ns=start,
                             batch_ms=100)
    per_flush = max(1, round(every_s * 1000 / 100))
    it = market.batches(None)
    rows, appended = [], []
    for k in range(flushes):
        for _ in range(per_flush):
            flow.push(next(it))
        n_before = len(flow.store.stored_times("1m"))
        rows.append(timed_flush(flow))
        appended.append(len(flow.store.stored_times("1m")) > n_before)
    flow.close()
    return rows, appended


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--flushes", type=int, default=600, help="flushes timed (after 10 untimed)")
    p.add_argument("--rate", type=float, default=50_000.0, help="simulated trades/s of event time")
    p.add_argument("--every-s", type=float, default=1.0, help="event time between flushes")
    p.add_argument("--store", default=str(OUT / "flush.zarr"))
    args = p.parse_args(argv)
    rows, appended = run(args.symbols, args.flushes + 10, args.rate, args.every_s, Path(args.store))
    rows, appended = rows[10:], np.array(appended[10:])
    print(f"{args.symbols} symbols, 6 timeframes, {len(rows)} flushes of {args.every_s:g} s of "
          f"event time at {args.rate:,.0f} trades/s ({appended.sum()} opened a new 1m bar)")
    print(f"{'step':<24}{'p50':>8}{'p99':>8}{'max':>8}   {'p50 patch':>9}{'p50 new bar':>12}  (ms)")
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        patch = np.percentile(v[~appended], 50) if (~appended).any() else np.nan
        new = np.percentile(v[appended], 50) if appended.any() else np.nan
        print(f"{key:<24}{np.percentile(v, 50):8.1f}{np.percentile(v, 99):8.1f}{v.max():8.1f}"
              f"   {patch:9.1f}{new:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
