"""Research helpers for the notebooks: replay bar files into a store, sector rotation, backtests.

Plain pandas on the frames the store holds (``time`` rows, one column per symbol or sector),
so a notebook only wires these together and plots.

Backtest conventions (see :func:`backtest`): a signal is known at the close of bar ``t`` and
sets the weights held over ``(t, t+1]`` -- it never earns bar ``t``'s own return -- and each
unit of turnover costs ``cost_bps`` basis points, charged to the period the trade opens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flows.breadth import read_symbols_file
from flows.pipeline import Flow, FlowConfig
from flows.runner import ReplaySummary, replay_files

__all__ = ["backtest", "performance", "replay_bars", "weekly_rotation"]


def replay_bars(bars_file: str | Path, store: str | Path, symbols_file: str | Path | None = None,
                tf: str = "1d") -> ReplaySummary:
    """Replay a file of ready-made ``tf`` bars through a flow into ``store`` and close it.

    The flow has analytics on, so afterwards the store holds ``bars/{tf}``, ``indicators/{tf}``,
    ``breadth/{tf}``, ``sectors/{tf}`` and the quality groups (``catalogs/market.yaml`` reads
    them all).

    Parameters
    ----------
    bars_file : CSV/Parquet of OHLCV bars (see ``tapeflow replay --bars``).
    store : the Zarr store to write (a fresh path, or one this file was replayed into).
    symbols_file : optional Symbol/Name/Sector CSV giving each symbol its sector.
    tf : the bars' timeframe.

    Returns
    -------
    The replay's summary (rows, seconds).
    """
    flow = Flow(FlowConfig(store=str(store), timeframes=(tf,)))
    try:
        if symbols_file is not None:
            flow.table.meta.update(read_symbols_file(str(symbols_file)))
        return replay_files(flow, [str(bars_file)], bars=tf)
    finally:
        flow.close()


def weekly_rotation(returns: pd.DataFrame, benchmark: pd.Series | None = None,
                    freq: str = "W-FRI") -> pd.DataFrame:
    """Compound per-bar returns into weekly ones and rank the columns each week.

    Parameters
    ----------
    returns : per-bar returns, rows ``time`` (a DatetimeIndex), one column per sector; NaN is
        no return (counted as 0).
    benchmark : optional per-bar market return on the same rows; ``relative`` is then each
        sector's weekly return minus the market's (relative strength), else equal to ``return``.
    freq : pandas offset of the weeks (labelled by their last day).

    Returns
    -------
    Long table with columns ``week, <columns' name or "sector">, return, relative, rank``;
    rank 1 is the strongest column of that week.

    Examples
    --------
    >>> days = pd.date_range("2018-01-01", periods=6, freq="B")  # Mon 1st .. Mon 8th
    >>> r = pd.DataFrame({"Tech": [0.1, 0.0, 0.0, 0.0, 0.0, -0.1],
    ...                   "Energy": [0.0, 0.0, 0.0, 0.0, 0.05, 0.1]}, index=days)
    >>> weekly_rotation(r).round({"return": 4, "relative": 4})
            week  sector  return  relative  rank
    0 2018-01-05    Tech    0.10      0.10     1
    1 2018-01-05  Energy    0.05      0.05     2
    2 2018-01-12    Tech   -0.10     -0.10     2
    3 2018-01-12  Energy    0.10      0.10     1
    """
    def weekly(r: pd.DataFrame | pd.Series):
        return (1.0 + r.fillna(0.0)).resample(freq).prod() - 1.0

    name = returns.columns.name or "sector"
    wk = weekly(returns)
    relative = wk.sub(weekly(benchmark), axis=0) if benchmark is not None else wk
    ranks = relative.rank(axis=1, ascending=False, method="min").astype(int)
    out = pd.DataFrame({
        "week": np.repeat(wk.index.values, wk.shape[1]),
        name: np.tile(np.asarray(wk.columns, dtype=object), len(wk)),
        "return": wk.to_numpy().ravel(),
        "relative": relative.to_numpy().ravel(),
        "rank": ranks.to_numpy().ravel(),
    })
    return out


def backtest(signal: pd.DataFrame, close: pd.DataFrame, cost_bps: float = 5.0) -> pd.DataFrame:
    """Backtest a long/flat rule, equal-weighted over the symbols, with costs per unit turnover.

    At the close of bar ``t`` each symbol with a close gets weight ``1 / N_t`` when its signal
    is true, else 0 (``N_t``: symbols with a close at ``t``; the rest is cash earning 0). Those
    weights earn the next bar's close-to-close returns, so a signal computed from bar ``t``'s
    closed values is never applied to bar ``t`` itself. Turnover is ``sum |w_t - w_{t-1}|``
    (starting from cash; drift of the weights within a bar is ignored, so holding every symbol
    throughout trades only on the first bar), and it costs ``cost_bps / 1e4`` per unit,
    charged to the period the trade opens. A held symbol without a close on the next bar
    returns 0 for that bar.

    Parameters
    ----------
    signal : bool, rows ``time``, one column per symbol: long after this bar's close?
        Missing rows/columns are false.
    close : closes on the same axes (NaN where a symbol has no bar).
    cost_bps : cost per unit of turnover, in basis points of equity.

    Returns
    -------
    One row per bar; row ``t`` is the period ``(t-1, t]``: ``exposure`` (sum of the weights
    held), ``turnover`` (the trades at ``t-1`` that set them), ``gross``, ``cost`` and ``net``
    returns, and ``equity`` (starting at 1). The first row has no period: zeros, equity 1.

    Examples
    --------
    Long A on day 0, switch to B on day 1 (5 bps a unit of turnover):

    >>> close = pd.DataFrame({"A": [100.0, 110.0, 99.0], "B": [50.0, 50.0, 55.0]})
    >>> signal = pd.DataFrame({"A": [True, False, False], "B": [False, True, False]})
    >>> backtest(signal, close, cost_bps=5.0).round(6)
       exposure  turnover  gross     cost      net    equity
    0       0.0       0.0   0.00  0.00000  0.00000  1.000000
    1       0.5       0.5   0.05  0.00025  0.04975  1.049750
    2       0.5       1.0   0.05  0.00050  0.04950  1.101713
    """
    signal = signal.reindex(index=close.index, columns=close.columns, fill_value=False).astype(bool)
    has_close = close.notna()
    n = has_close.sum(axis=1)
    weights = (signal & has_close).astype(float).div(n.where(n > 0), axis=0).fillna(0.0)
    traded = (weights - weights.shift(1, fill_value=0.0)).abs().sum(axis=1)
    returns = (close / close.shift(1) - 1.0).fillna(0.0)
    held = weights.shift(1, fill_value=0.0)
    gross = (held * returns).sum(axis=1)
    turnover = traded.shift(1, fill_value=0.0)
    cost = turnover * cost_bps / 1e4
    net = gross - cost
    return pd.DataFrame({"exposure": held.sum(axis=1), "turnover": turnover, "gross": gross,
                         "cost": cost, "net": net, "equity": (1.0 + net).cumprod()})


def performance(result: pd.DataFrame, periods_per_year: int = 252) -> pd.Series:
    """Summarise a :func:`backtest` result.

    Parameters
    ----------
    result : the backtest's frame (its first row has no period and is left out).
    periods_per_year : bars per year, to annualise (252 trading days).

    Returns
    -------
    ``total_return``; ``cagr`` (the total compounded to a year: on a few months of data a
    loose extrapolation); ``volatility`` and ``sharpe`` (annualised, risk-free rate 0);
    ``max_drawdown`` (negative); ``turnover`` (per year, in units of equity); ``exposure``
    (mean sum of weights).

    Examples
    --------
    >>> result = pd.DataFrame({"exposure": [0.0, 1.0, 1.0], "turnover": [0.0, 1.0, 0.0],
    ...                        "net": [0.0, 0.1, -0.1], "equity": [1.0, 1.1, 0.99]})
    >>> performance(result, periods_per_year=2).round(4).to_dict()
    {'total_return': -0.01, 'cagr': -0.01, 'volatility': 0.2, 'sharpe': 0.0, 'max_drawdown': -0.1, 'turnover': 1.0, 'exposure': 1.0}
    """
    period = result.iloc[1:]
    n = len(period)
    net, equity = period["net"], result["equity"]
    std = net.std(ddof=1)
    return pd.Series({
        "total_return": equity.iloc[-1] - 1.0,
        "cagr": equity.iloc[-1] ** (periods_per_year / n) - 1.0,
        "volatility": std * np.sqrt(periods_per_year),
        "sharpe": net.mean() / std * np.sqrt(periods_per_year) if std > 0 else np.nan,
        "max_drawdown": (equity / equity.cummax() - 1.0).min(),
        "turnover": period["turnover"].sum() / n * periods_per_year,
        "exposure": period["exposure"].mean(),
    })
