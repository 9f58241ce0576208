"""Cost of the analytics stage per second of a live market, as a share of one core.

A 500-symbol simulated market at 50k trades/s (event time) goes through the flow in memory;
every simulated second the analytics refresh (indicators, breadth, sectors, quality of all six
timeframes), as the flusher does live. Printed: CPU seconds of each part per second of market,
i.e. the share of one core it needs, beside the bar stage and validation in the same run.

    .venv/bin/python bench/bench_analytics.py [--seconds 120] [--symbols 500] [--rate 50000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.feeds.simulated import SimulatedMarket  # noqa: E402
from flows.pipeline import Flow, FlowConfig  # noqa: E402
from flows.schema import NS  # noqa: E402


def run(batches: list, table_flow: Flow, quality: bool) -> tuple[float, float, float]:
    """Push the batches; return CPU seconds of (push, bar stage, analytics refresh)."""
    flow = table_flow
    push = refresh = 0.0
    for i, batch in enumerate(batches):
        t0 = time.process_time()
        flow.push(batch)
        t1 = time.process_time()
        push += t1 - t0
        if (i + 1) % 10 == 0:  # 100 ms batches: refresh once a second of market
            flow.analytics.refresh()
            refresh += time.process_time() - t1
    return push, flow.stats.bar_seconds, refresh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="seconds of market (event time)")
    ap.add_argument("--symbols", type=int, default=500)
    ap.add_argument("--rate", type=float, default=50_000.0, help="trades per second (average)")
    args = ap.parse_args()

    cpu = {}
    for quality in (False, True):
        flow = Flow(FlowConfig(store=None, quality=quality))
        # The simulated session opens at about twice its mean activity: ask for half.
        market = SimulatedMarket(flow.table, n_symbols=args.symbols, rate=args.rate / 2,
                                 start_ns=1_710_509_400 * NS, batch_ms=100)
        batches = list(market.batches(args.seconds))
        trades = sum(len(b) for b in batches)
        cpu[quality] = run(batches, flow, quality)
    (push0, bar0, refresh0), (push1, bar1, refresh1) = cpu[False], cpu[True]
    observe = max(push1 - push0, 0.0)
    print(f"{args.symbols} symbols, {trades:,} trades over {args.seconds:.0f} s of market "
          f"({trades / args.seconds:,.0f} trades/s), 6 timeframes, analytics refreshed once a second")
    print(f"{'part':<58}{'CPU s':>7}{'share of one core':>19}")
    rows = [("bar stage (BarEngine.update)", bar1),
            ("validation + streamz + bookkeeping", push0 - bar0),
            ("quality: per-trade observe", observe),
            ("analytics refresh: indicators, breadth, sectors, quality", refresh1),
            ("analytics stage total (refresh + quality observe)", refresh1 + observe)]
    for name, sec in rows:
        print(f"{name:<58}{sec:>7.2f}{100 * sec / args.seconds:>18.1f}%")


if __name__ == "__main__":
    main()
