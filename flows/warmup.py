"""Compile the flow's numba kernels before anyone waits for them.

The bar, quality, breadth and indicator kernels are compiled on first use and cached on disk
(``numba.njit(cache=True)``, in ``flows/__pycache__``). In a fresh checkout the first use costs
about 30 s of one core; without a warm-up that lands in the first page a user opens (or, in a
busy test run, in the flow's thread while it holds the flow's lock). :func:`warm_up` runs a
tiny simulated market through a flow with no store and reads every view the dashboards read,
so every kernel is compiled (or loaded from the cache, ~1 s) at once. ``tapeflow serve`` runs
it before it starts listening.
"""
from __future__ import annotations

import time

from flows.schema import NS, BarBatch

#: 2024-01-02 14:30 UTC (a NYSE open), whole minutes.
_START = 1_704_205_800 * NS


def warm_up(timeframes: tuple[str, ...] | None = None) -> float:
    """Compile (or load) every kernel the flow and the dashboards' reads use; return seconds.

    Examples
    --------
    >>> warm_up(("1m", "5m")) >= 0
    True
    """
    from flows.bars import TIMEFRAMES
    from flows.feeds.simulated import SimulatedMarket
    from flows.pipeline import Flow, FlowConfig

    t0 = time.perf_counter()
    tfs = tuple(timeframes or TIMEFRAMES)
    flow = Flow(FlowConfig(store=None, timeframes=tfs, window=30, history=120))
    try:
        market = SimulatedMarket(flow.table, n_symbols=3, rate=30.0, seed=1, start_ns=_START,
                                 batch_ms=1000)
        for batch in market.batches(3 * 60):
            flow.push(batch)
        symbol = market.tickers[0]
        for tf in tfs:
            flow.bars(tf, symbol)
            flow.symbol_indicators(tf, symbol)
            flow.indicators(tf)
            flow.breadth(tf)
            flow.sectors(tf)
            flow.heatmap(tf)
            flow.quality(tf)
            flow.quality_feeds(tf)
        # Ready-made bars (a venue's minute bars) go through their own kernels: the next
        # minute of the first symbol, as one bar.
        last = flow.bars(tfs[0], symbol).index[-1].value
        flow.push_bars(tfs[0], BarBatch.from_columns(
            flow.table, time=[last + 60 * NS], symbol=[symbol], open=[10.0], high=[10.5],
            low=[9.5], close=[10.2], volume=[100.0]))
        flow.bars(tfs[0], symbol)
    finally:
        flow.close()
    return time.perf_counter() - t0


__all__ = ["warm_up"]
