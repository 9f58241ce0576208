"""What the dashboards read: the :class:`BarSource` and :class:`MarketSource` protocols and an
in-memory implementation.

The flow (``flows.pipeline``) implements both; dashboards use nothing else of it.
:class:`FrameSource` holds bars in pandas DataFrames, for tests, notebooks and demos; its
``upsert`` and ``simulate`` mimic a live flow (the forming bar changes in place, new bars are
appended), and it derives breadth, sector, heatmap, indicator, quality and monitor figures from
its bars with the flow's shapes (synthetic but consistent: the heatmap's advancers are the
breadth's). Quarantined records, alert rules and fired alerts are kept in memory; ``quarantine``
and ``fire`` add records as a flow would.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import xarray as xr

from flows.alerts import Alert, Rule
from flows.quality import COMPONENTS, QUALITY_ATTRS, TOLERANCES, WEIGHTS
from flows.schema import BAR_FIELDS, REASONS, TIMEFRAMES

log = logging.getLogger(__name__)

#: Bar columns in contract order (``trades`` is int64, the rest float64).
BAR_COLUMNS: tuple[str, ...] = tuple(BAR_FIELDS)


@runtime_checkable
class BarSource(Protocol):
    """Read access to live OHLCV bars: the only thing a dashboard knows about a flow.

    All methods must be safe to call from the dashboard server's thread while the flow writes.
    """

    def symbols(self) -> list[str]:
        """Return the known symbols, in a stable order."""

    def meta(self, symbol: str) -> dict:
        """Return ``{"sector", "name", "exchange"}`` for ``symbol`` (any key may be missing)."""

    def timeframes(self) -> tuple[str, ...]:
        """Return the timeframes kept, a subset of ``1m 5m 15m 1h 4h 1d`` in that order."""

    def bars(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        """Return the last ``n`` bars (all when ``None``) in which ``symbol`` traded.

        The index is ``time`` (``datetime64[ns]``, UTC, bar open time); the columns are
        ``open high low close volume trades vwap`` (float64, ``trades`` int64). The last row may
        be the forming bar, which changes in place; new bars appear at the end. A symbol
        without bars gives an empty frame with those columns.
        """

    def version(self) -> int:
        """Return a counter that increases whenever any bar changes (cheap to call)."""

    def status(self) -> dict:
        """Return at least ``feed``, ``state`` (str) and ``received``, ``accepted``,
        ``quarantined``, ``duplicates`` (int)."""


@runtime_checkable
class MarketSource(BarSource, Protocol):
    """A :class:`BarSource` that also serves the flow's market-wide analytics and its monitor
    figures (the market and monitor pages read these). All are snapshots: safe to keep."""

    def indicators(self, tf: str) -> xr.Dataset:
        """Return indicators over ``time × symbol`` (``sma_20`` ..., and ``provisional(time)``)."""

    def breadth(self, tf: str) -> xr.Dataset:
        """Return breadth over ``time``: ``advancers decliners unchanged ad_line new_highs
        new_lows pct_above_sma_50 pct_above_sma_200 up_volume down_volume mcclellan``."""

    def sectors(self, tf: str) -> xr.Dataset:
        """Return sector figures over ``time × sector``: ``return return_vw advancers decliners
        unchanged volume``."""

    def heatmap(self, tf: str) -> pd.DataFrame:
        """Return the latest row's ``symbol sector name return volume``, one row per symbol that
        traded in the session (``return`` is NaN without a reference close)."""

    def symbol_indicators(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        """Return one symbol's indicators on the rows of ``bars(tf, symbol, n)`` (same index):
        ``sma_20 sma_50 sma_200 ema_12 ema_26 ema_50 rsi_14 macd macd_signal macd_hist bb_upper
        bb_middle bb_lower stoch_k stoch_d atr_14 adx_14 volume_sma_20 vwap_session`` and
        ``provisional`` (bool, True on the forming bar)."""

    def monitor(self) -> dict:
        """Return pipeline figures: at least ``received`` (int), ``flush_ms_p50``,
        ``flush_ms_p99`` (float or None), ``last_flush`` (epoch s, 0 if never) and
        ``store_bytes`` (int)."""

    def quality(self, tf: str) -> xr.Dataset:
        """Return data quality over ``time × symbol``: ``score`` and its components
        ``rejected duplicates late staleness spike volume_outlier ohlc id_gaps`` (0-100, 100 is
        clean; see :mod:`flows.quality`). A cell where nothing happened scores 100."""

    def quality_feeds(self, tf: str) -> xr.Dataset:
        """Return data quality over ``time × feed``, with the variables of :meth:`quality`."""

    def quarantine_log(self, n: int = 1000) -> pd.DataFrame:
        """Return the latest ``n`` quarantined records, newest first: ``time`` (event time,
        ``datetime64[ns]``, NaT when unparsable), ``symbol``, ``reason`` (one of
        :data:`flows.schema.REASONS`) and ``raw`` (the payload as received, or empty)."""

    def feed_healths(self) -> list[dict]:
        """Return one dict per feed: at least ``feed`` and ``state``; live venue feeds add
        ``messages_per_s trades_per_s lag_ms_p50 lag_ms_p90 lag_ms_p99 reconnects gaps
        missing_ids dropped_frames quarantined last_error`` (see
        :class:`flows.feeds.health.FeedHealth`). Readers treat a missing key as unknown."""

    def alert_rules(self) -> list[dict]:
        """Return the alert rules: ``id``, ``text`` (the one-line form), ``kind``, ``symbol``,
        ``tf``."""

    def add_alert_rule(self, spec: str) -> dict:
        """Add a rule from its one-line text (see :class:`flows.alerts.Rule`) and return it as
        in :meth:`alert_rules`; raise ValueError with a one-line reason for a bad rule."""

    def remove_alert_rule(self, rule_id: str) -> bool:
        """Remove the rule with this id (or text); return whether one was removed."""

    def fired_alerts(self, n: int = 500) -> pd.DataFrame:
        """Return the latest ``n`` fired alerts, newest first: ``time`` (bar open) and
        ``fired_at`` (``datetime64[ns]``), ``symbol``, ``tf``, ``rule``, ``rule_id``, ``kind``,
        ``value``, ``threshold``, ``message``."""


#: Columns of :meth:`MarketSource.heatmap`.
HEATMAP_COLUMNS: tuple[str, ...] = ("symbol", "sector", "name", "return", "volume")
#: Variables of :meth:`MarketSource.breadth`.
BREADTH_VARIABLES: tuple[str, ...] = (
    "advancers", "decliners", "unchanged", "ad_line", "new_highs", "new_lows",
    "pct_above_sma_50", "pct_above_sma_200", "up_volume", "down_volume", "mcclellan")
#: Variables of :meth:`MarketSource.sectors`.
SECTOR_VARIABLES: tuple[str, ...] = (
    "return", "return_vw", "advancers", "decliners", "unchanged", "volume")
#: Columns of :meth:`MarketSource.quarantine_log`.
QUARANTINE_COLUMNS: tuple[str, ...] = ("time", "symbol", "reason", "raw")
#: Columns of :meth:`MarketSource.fired_alerts`.
ALERT_COLUMNS: tuple[str, ...] = ("time", "fired_at", "symbol", "tf", "rule", "rule_id", "kind",
                                  "value", "threshold", "message")


def empty_bars() -> pd.DataFrame:
    """Return an empty bar frame with the contract's index, columns and dtypes."""
    index = pd.DatetimeIndex(np.empty(0, "datetime64[ns]"), name="time")
    return pd.DataFrame({c: np.empty(0, BAR_FIELDS[c]) for c in BAR_COLUMNS}, index=index)


def _normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` (index or column ``time``) in the contract's shape, sorted by time."""
    if "time" in frame.columns:
        frame = frame.set_index("time")
    out = frame.loc[:, list(BAR_COLUMNS)].astype(BAR_FIELDS)
    out.index = pd.DatetimeIndex(out.index, name="time").astype("datetime64[ns]")
    return out[~out.index.duplicated(keep="last")].sort_index()


class FrameSource:
    """An in-memory :class:`BarSource` over pandas DataFrames.

    Parameters
    ----------
    frames : mapping of timeframe to DataFrame
        Bars in long form: a ``time`` index (or column), a ``symbol`` column and the bar
        columns. Timeframes are kept in canonical order.
    meta : mapping of symbol to dict, optional
        Symbol metadata (``sector``, ``name``, ``exchange``).
    symbols : sequence of str, optional
        Symbols to list, including ones without bars yet; default: those in ``frames``.
    feed : str
        Name reported by :meth:`status`.

    Examples
    --------
    >>> t = pd.to_datetime(["2024-01-02 09:30", "2024-01-02 09:31"])
    >>> df = pd.DataFrame({"time": t, "symbol": "X", "open": [1.0, 2.0], "high": [2.0, 3.0],
    ...                    "low": [1.0, 2.0], "close": [2.0, 2.5], "volume": [10.0, 5.0],
    ...                    "trades": [3, 2], "vwap": [1.5, 2.2]})
    >>> src = FrameSource({"1m": df})
    >>> src.bars("1m", "X", n=1)["close"].tolist()
    [2.5]
    >>> v = src.version()
    >>> src.upsert("1m", "X", df.iloc[[1]].assign(close=2.7))
    >>> src.version() > v, src.bars("1m", "X")["close"].tolist()
    (True, [2.0, 2.7])
    """

    def __init__(
        self,
        frames: Mapping[str, pd.DataFrame],
        meta: Mapping[str, dict] | None = None,
        symbols: Sequence[str] | None = None,
        feed: str = "frames",
    ):
        unknown = [tf for tf in frames if tf not in TIMEFRAMES]
        if unknown:
            raise ValueError(f"unknown timeframe {unknown[0]!r}")
        self._lock = threading.Lock()
        self._bars: dict[str, dict[str, pd.DataFrame]] = {}
        for tf, frame in frames.items():
            self._bars[tf] = {
                str(sym): _normalize(part) for sym, part in frame.groupby("symbol", sort=False)
            }
        names = list(symbols) if symbols is not None else []
        for per_symbol in self._bars.values():
            names += [s for s in per_symbol if s not in names]
        self._symbols = names
        self._meta = {k: dict(v) for k, v in (meta or {}).items()}
        self._version = 0
        self._changed_at = time.time()
        self._status = {"feed": feed, "state": "LIVE", "received": 0, "accepted": 0,
                        "quarantined": 0, "duplicates": 0, "quarantined_by_reason": {}}
        self._wide_memo: tuple[tuple[str, int], dict[str, pd.DataFrame]] | None = None
        self._quarantined: deque[tuple] = deque(maxlen=10_000)
        self._rules: dict[str, Rule] = {}
        self._fired: deque[Alert] = deque(maxlen=1000)

    def symbols(self) -> list[str]:
        with self._lock:
            return list(self._symbols)

    def meta(self, symbol: str) -> dict:
        return dict(self._meta.get(symbol, {}))

    def timeframes(self) -> tuple[str, ...]:
        return tuple(tf for tf in TIMEFRAMES if tf in self._bars)

    def bars(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        with self._lock:
            frame = self._bars.get(tf, {}).get(symbol)
            if frame is None:
                return empty_bars()
            return (frame if n is None else frame.iloc[-n:] if n > 0 else frame.iloc[:0]).copy()

    def version(self) -> int:
        return self._version

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    # -- market analytics (MarketSource) ------------------------------------------------------
    #
    # Synthetic but consistent: each symbol's reference close (the flow's "previous session
    # close") is the close of its first bar in the window, so returns, advancers, sectors and
    # the heatmap all agree with one another and with the bars.

    #: Optional cache (anything with ``get_or_compute(key, fn)`` and ``stats()``, such as
    #: :class:`flows.cache.Cache`) for the wide frames the analytics derive from; the monitor
    #: page charts its statistics. Without one a single frame set is memoized per version.
    cache = None

    def _wide(self, tf: str) -> dict[str, pd.DataFrame]:
        """Return ``close high low volume`` as ``time × symbol`` frames (memoized per version)."""
        key = (tf, self._version)
        if self.cache is not None:
            return self.cache.get_or_compute(("wide", *key), lambda: self._compute_wide(tf))
        with self._lock:
            if self._wide_memo is not None and self._wide_memo[0] == key:
                return self._wide_memo[1]
        wide = self._compute_wide(tf)
        with self._lock:
            self._wide_memo = (key, wide)
        return wide

    def _compute_wide(self, tf: str) -> dict[str, pd.DataFrame]:
        with self._lock:
            per_symbol = {s: f for s, f in self._bars.get(tf, {}).items() if not f.empty}
            names = [s for s in self._symbols if s in per_symbol]
        index = pd.DatetimeIndex(np.empty(0, "datetime64[ns]"), name="time")
        wide = {}
        for field in ("close", "high", "low", "volume"):
            if names:
                frame = pd.concat({s: per_symbol[s][field] for s in names}, axis=1).sort_index()
            else:
                frame = pd.DataFrame(index=index, columns=pd.Index([], name="symbol"), dtype=float)
            frame.columns.name = "symbol"
            wide[field] = frame
        return wide

    def _returns(self, close: pd.DataFrame) -> pd.DataFrame:
        return close / close.bfill().iloc[0] - 1.0 if len(close) else close

    def indicators(self, tf: str) -> xr.Dataset:
        """Return SMAs (20/50/200), EMAs (12/26) and ``volume_sma_20`` over each symbol's bars,
        and ``provisional`` (true on the last row)."""
        wide = self._wide(tf)
        close, volume = wide["close"], wide["volume"]
        out = {}
        for n in (20, 50, 200):
            out[f"sma_{n}"] = close.apply(lambda c, n=n: c.dropna().rolling(n).mean())
        for n in (12, 26):
            out[f"ema_{n}"] = close.apply(
                lambda c, n=n: c.dropna().ewm(span=n, adjust=False, min_periods=n).mean())
        out["volume_sma_20"] = volume.where(close.notna()).apply(
            lambda v: v.dropna().rolling(20).mean())
        data = {k: (("time", "symbol"), v.reindex(close.index).to_numpy(dtype=float))
                for k, v in out.items()}
        data["provisional"] = ("time", np.arange(len(close)) == len(close) - 1)
        return xr.Dataset(data, coords={"time": close.index.values,
                                        "symbol": np.array(close.columns, dtype=object)})

    def symbol_indicators(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        """Return one symbol's indicators on the rows of :meth:`bars` (computed with the flow's
        :class:`~flows.indicators.IndicatorEngine` over its bars), plus ``provisional``."""
        from flows.indicators import IndicatorEngine

        def compute() -> pd.DataFrame:
            bars = self.bars(tf, symbol)
            if bars.empty:
                return pd.DataFrame({"provisional": np.zeros(0, bool)}, index=bars.index)
            fields = {c: bars[c].to_numpy(dtype=float)[:, None] for c in BAR_COLUMNS}
            engine = IndicatorEngine()
            engine.update(bars.index.asi8, fields, start=0, forming=True)
            out = {k: (v if k == "provisional" else v[:, 0]) for k, v in engine.outputs().items()}
            return pd.DataFrame(out, index=bars.index)

        key = ("symbol_indicators", tf, symbol, self._version)
        frame = (self.cache.get_or_compute(key, compute) if self.cache is not None else compute())
        return frame if n is None else frame.iloc[-n:] if n > 0 else frame.iloc[:0]

    def breadth(self, tf: str) -> xr.Dataset:
        """Return breadth over ``time`` (see :class:`MarketSource`), from the bars."""
        wide = self._wide(tf)
        close, high, low, volume = wide["close"], wide["high"], wide["low"], wide["volume"]
        ret = self._returns(close)
        adv, dec, unch = ret > 0, ret < 0, ret == 0
        net = (adv.sum(axis=1) - dec.sum(axis=1)).astype("int64")
        prior_high = high.rolling(20, min_periods=1).max().shift(1)
        prior_low = low.rolling(20, min_periods=1).min().shift(1)
        data = {
            "advancers": adv.sum(axis=1).astype("int64"),
            "decliners": dec.sum(axis=1).astype("int64"),
            "unchanged": unch.sum(axis=1).astype("int64"),
            "ad_line": net.cumsum(),
            "new_highs": (high > prior_high).sum(axis=1).astype("int64"),
            "new_lows": (low < prior_low).sum(axis=1).astype("int64"),
            "up_volume": volume.where(adv).sum(axis=1).astype(float),
            "down_volume": volume.where(dec).sum(axis=1).astype(float),
            "mcclellan": (net.ewm(span=19, adjust=False).mean()
                          - net.ewm(span=39, adjust=False).mean()),
        }
        for n in (50, 200):
            sma = close.rolling(n).mean()
            defined = sma.notna().sum(axis=1)
            above = (close > sma).sum(axis=1)
            data[f"pct_above_sma_{n}"] = (100.0 * above / defined.where(defined > 0)).astype(float)
        return xr.Dataset({k: ("time", data[k].to_numpy()) for k in BREADTH_VARIABLES},
                          coords={"time": close.index.values})

    def _sector_of(self, symbols: Sequence[str]) -> np.ndarray:
        return np.array([self._meta.get(s, {}).get("sector") or "Unknown" for s in symbols],
                        dtype=object)

    def sectors(self, tf: str) -> xr.Dataset:
        """Return sector figures over ``time × sector`` (see :class:`MarketSource`)."""
        wide = self._wide(tf)
        close, volume = wide["close"], wide["volume"]
        ret = self._returns(close)
        sector = self._sector_of(list(close.columns))
        names = sorted(set(sector))
        dollars = (close * volume).where(ret.notna())
        out: dict[str, list[np.ndarray]] = {k: [] for k in SECTOR_VARIABLES}
        for name in names:
            cols = close.columns[sector == name]
            r, d = ret[cols], dollars[cols]
            out["return"].append(r.mean(axis=1).to_numpy())
            out["return_vw"].append(((r * d).sum(axis=1) / d.sum(axis=1).where(lambda x: x > 0))
                                    .to_numpy())
            out["advancers"].append((r > 0).sum(axis=1).to_numpy())
            out["decliners"].append((r < 0).sum(axis=1).to_numpy())
            out["unchanged"].append((r == 0).sum(axis=1).to_numpy())
            out["volume"].append(volume[cols].sum(axis=1).to_numpy(dtype=float))
        n = len(close)
        data = {k: (("time", "sector"), np.stack(v, axis=1) if v else np.empty((n, 0)))
                for k, v in out.items()}
        return xr.Dataset(data, coords={"time": close.index.values,
                                        "sector": np.array(names, dtype=object)})

    def heatmap(self, tf: str) -> pd.DataFrame:
        """Return each symbol's latest return and its volume over the window, by sector."""
        wide = self._wide(tf)
        close, volume = wide["close"], wide["volume"]
        symbols = list(close.columns)
        last = self._returns(close).ffill().iloc[-1] if len(close) else pd.Series(dtype=float)
        out = pd.DataFrame({
            "symbol": np.array(symbols, dtype=object),
            "sector": self._sector_of(symbols),
            "name": np.array([self._meta.get(s, {}).get("name", "") for s in symbols],
                             dtype=object),
            "return": last.reindex(symbols).to_numpy(dtype=float),
            "volume": volume.sum(axis=0).reindex(symbols).to_numpy(dtype=float),
        }, columns=list(HEATMAP_COLUMNS))
        return out.sort_values(["sector", "symbol"], kind="stable").reset_index(drop=True)

    def monitor(self) -> dict:
        """Return monitor figures in the flow's shape (flush times are a fixed demo value)."""
        status = self.status()
        return {"received": status["received"], "accepted": status["accepted"],
                "batches": self._version, "flush_ms_p50": 1.0, "flush_ms_p99": 4.0,
                "last_flush": self._changed_at, "flushes": self._version, "store": None,
                "store_bytes": 0}

    # -- quality, quarantine, feeds and alerts (the Quality and Alerts pages) -----------------
    #
    # Quality is synthetic but consistent with the bars: a bar without trades (volume 0) fails
    # ``staleness``, a bar breaking an OHLC invariant fails ``ohlc``, every other component is
    # clean, and the score combines them with the flow's weights. The quarantine log and the
    # fired alerts hold what :meth:`quarantine` and :meth:`fire` recorded.

    def _quality_cells(self, tf: str) -> dict[str, pd.DataFrame]:
        """Return ``staleness`` and ``ohlc`` (0 or 100; 100 where the symbol has no bar) and
        ``present`` (the symbol has a bar) as ``time × symbol`` frames."""
        with self._lock:
            per_symbol = {s: f for s, f in self._bars.get(tf, {}).items() if not f.empty}
            names = [s for s in self._symbols if s in per_symbol]
        index = pd.DatetimeIndex(np.empty(0, "datetime64[ns]"), name="time")
        for name in names:
            index = index.union(per_symbol[name].index)
        present = np.zeros((len(index), len(names)), bool)
        failed = {"staleness": present.copy(), "ohlc": present.copy()}
        for j, name in enumerate(names):
            bars = per_symbol[name]
            rows = index.get_indexer(bars.index)
            o, h, lo, c, v, w = (bars[k].to_numpy() for k in
                                 ("open", "high", "low", "close", "volume", "vwap"))
            present[rows, j] = True
            failed["staleness"][rows, j] = v == 0
            # NaN prices (a bar without trades) compare False: not broken.
            failed["ohlc"][rows, j] = ((lo > np.fmin(o, c)) | (h < np.fmax(o, c)) | (w < lo)
                                       | (w > h) | ((bars["trades"].to_numpy() > 0) & ~(v > 0)))
        columns = pd.Index(names, name="symbol", dtype=object)
        cells = {k: pd.DataFrame(np.where(f, 0.0, 100.0), index=index, columns=columns)
                 for k, f in failed.items()}
        cells["present"] = pd.DataFrame(present, index=index, columns=columns)
        return cells

    def quality(self, tf: str) -> xr.Dataset:
        """Return quality over ``time × symbol`` (see :class:`MarketSource`), from the bars.

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=3)
        >>> src.upsert("1m", "BBB", src.bars("1m", "BBB", n=1).assign(volume=0.0, trades=0))
        >>> q = src.quality("1m").isel(time=-1)
        >>> q["staleness"].values.tolist(), q["score"].values.tolist()
        ([100.0, 0.0], [100.0, 50.0])
        """
        cells = self._quality_cells(tf)
        present = cells["present"]
        return _quality_dataset({k: cells[k].to_numpy() for k in ("staleness", "ohlc")},
                                present.index.values, "symbol",
                                np.array(present.columns, dtype=object))

    def quality_feeds(self, tf: str) -> xr.Dataset:
        """Return quality over ``time × feed`` for the one feed of :meth:`status`: its
        ``staleness`` and ``ohlc`` fall with the share of symbols stale / bars broken in a row,
        reaching 0 at the flow's tolerance (10 %).

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=3)
        >>> src.upsert("1m", "BBB", src.bars("1m", "BBB", n=1).assign(volume=0.0, trades=0))
        >>> src.quality_feeds("1m")["staleness"].sel(feed="synthetic").values.tolist()
        [100.0, 100.0, 0.0]
        """
        cells = self._quality_cells(tf)
        present = cells["present"].to_numpy()
        symbols = max(present.shape[1], 1)
        stale_share = (cells["staleness"].to_numpy() == 0).sum(axis=1) / symbols
        broken_share = ((cells["ohlc"].to_numpy() == 0).sum(axis=1)
                        / np.maximum(present.sum(axis=1), 1))
        components = {
            "staleness": 100 * np.maximum(0.0, 1 - stale_share / TOLERANCES["staleness"]),
            "ohlc": 100 * np.maximum(0.0, 1 - broken_share / TOLERANCES["ohlc"]),
        }
        return _quality_dataset({k: v[:, None] for k, v in components.items()},
                                cells["present"].index.values, "feed",
                                np.array([self.status()["feed"]], dtype=object))

    def quarantine(self, symbol: str, reason: str, at: object = None, raw: str = "") -> None:
        """Record a quarantined trade, as a flow would (for tests and demos).

        ``reason`` is one of :data:`flows.schema.REASONS`; ``at`` the trade's event time (None
        when it was unparsable); ``raw`` the payload as received. The counts of :meth:`status`
        follow.

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA"], n_bars=3)
        >>> src.quarantine("AAA", "non_positive_price", at="2024-01-02 15:59")
        >>> src.quarantine("", "malformed", raw="{oops")
        >>> log = src.quarantine_log()
        >>> log["reason"].tolist(), log["time"].isna().tolist(), src.status()["quarantined"]
        (['malformed', 'non_positive_price'], [True, False], 2)
        """
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r} "
                             f"(expected one of {', '.join(REASONS)})")
        stamp = None if at is None else pd.Timestamp(at)
        with self._lock:
            self._quarantined.append((stamp, symbol, reason, raw))
            by_reason = dict(self._status["quarantined_by_reason"])
            by_reason[reason] = by_reason.get(reason, 0) + 1
            self._status.update(received=self._status["received"] + 1,
                                quarantined=self._status["quarantined"] + 1,
                                quarantined_by_reason=by_reason)

    def quarantine_log(self, n: int = 1000) -> pd.DataFrame:
        """Return the latest ``n`` records of :meth:`quarantine`, newest first."""
        with self._lock:
            rows = list(self._quarantined)[-n:][::-1] if n > 0 else []
        frame = pd.DataFrame(rows, columns=list(QUARANTINE_COLUMNS))
        frame["time"] = pd.to_datetime(frame["time"]).astype("datetime64[ns]")
        return frame

    def feed_healths(self) -> list[dict]:
        """Return the one feed's health from :meth:`status` (the reduced form a flow without a
        venue feed reports; ``set_status`` may add ``reconnects``, ``gaps``, ``last_error``)."""
        status = self.status()
        return [{"feed": status["feed"], "state": status["state"],
                 "received": status["received"], "trades": status["accepted"],
                 "quarantined": status["quarantined"],
                 **{k: status.get(k, 0) for k in ("reconnects", "gaps")},
                 "last_error": status.get("last_error")}]

    def alert_rules(self) -> list[dict]:
        """Return the rules added (see :class:`MarketSource`)."""
        with self._lock:
            return [_rule_dict(rule) for rule in self._rules.values()]

    def add_alert_rule(self, spec: str) -> dict:
        """Add a rule (replacing one with the same condition) and return it.

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA"], n_bars=3)
        >>> src.add_alert_rule("* rsi_14 > 70 on 5m")["text"]
        '* rsi_14 > 70 on 5m'
        >>> src.add_alert_rule("* rsi_14 >> 70")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: bad alert rule '* rsi_14 >> 70': unknown operator '>>' (expected one of ...)
        """
        rule = Rule.parse(spec)
        with self._lock:
            self._rules[rule.id] = rule
        return _rule_dict(rule)

    def remove_alert_rule(self, rule_id: str) -> bool:
        """Remove the rule with this id (or text); return whether one was removed."""
        with self._lock:
            if self._rules.pop(rule_id, None) is not None:
                return True
        try:
            rule_id = Rule.parse(rule_id).id
        except ValueError:  # neither an id nor a rule's text
            return False
        with self._lock:
            return self._rules.pop(rule_id, None) is not None

    def fire(self, rule: str, symbol: str, at: object, value: float, threshold: float,
             fired_at: object = None) -> None:
        """Record that ``rule`` (an id of :meth:`alert_rules`, or a rule's text) fired on
        ``symbol``'s bar opening ``at``, as a flow would (for tests and demos).

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA"], n_bars=3)
        >>> src.fire("AAA close > 10", "AAA", "2024-01-02 15:58", 10.5, 10.0)
        >>> alert = src.fired_alerts().iloc[0]
        >>> alert.symbol, alert.tf, float(alert.value), alert.message
        ('AAA', '1m', 10.5, 'AAA close 10.5 > 10 (1m bar 2024-01-02T15:58:00)')
        """
        with self._lock:
            known = self._rules.get(rule)
        parsed = known or Rule.parse(rule)
        t = pd.Timestamp(at)
        message = (f"{symbol} {parsed.field} {value:.6g} {parsed.op} {threshold:.6g} "
                   f"({parsed.tf} bar {t.isoformat()})")
        fired = time.time_ns() if fired_at is None else pd.Timestamp(fired_at).value
        alert = Alert(parsed.id, parsed.text, parsed.kind, symbol, parsed.tf, t.value,
                      float(value), float(threshold), message, max(fired, t.value))
        with self._lock:
            self._fired.append(alert)

    def fired_alerts(self, n: int = 500) -> pd.DataFrame:
        """Return the latest ``n`` alerts of :meth:`fire`, newest first."""
        with self._lock:
            alerts = list(self._fired)[-n:][::-1] if n > 0 else []
        frame = pd.DataFrame([{c: getattr(a, c) for c in ALERT_COLUMNS} for a in alerts],
                             columns=list(ALERT_COLUMNS))
        for c in ("time", "fired_at"):
            frame[c] = pd.to_datetime(frame[c].to_numpy(np.int64).view("datetime64[ns]"))
        return frame.astype({"value": float, "threshold": float})

    def set_status(self, **fields: object) -> None:
        """Update the fields reported by :meth:`status` (e.g. ``state="STALE"``)."""
        with self._lock:
            self._status.update(fields)

    def upsert(self, tf: str, symbol: str, rows: pd.DataFrame) -> None:
        """Insert or replace bars of ``symbol`` by time (the forming bar is replaced in place).

        ``rows`` has a ``time`` index or column and the bar columns.
        """
        if tf not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {tf!r}")
        new = _normalize(rows)
        with self._lock:
            per_symbol = self._bars.setdefault(tf, {})
            old = per_symbol.get(symbol)
            if old is None or old.empty:
                per_symbol[symbol] = new
            elif new.index.min() > old.index.max():
                per_symbol[symbol] = pd.concat([old, new])
            else:
                both = pd.concat([old, new])
                per_symbol[symbol] = both[~both.index.duplicated(keep="last")].sort_index()
            if symbol not in self._symbols:
                self._symbols.append(symbol)
            self._status["received"] += len(new)
            self._status["accepted"] += len(new)
            self._version += 1
            self._changed_at = time.time()

    def append(self, tf: str, symbol: str, rows: pd.DataFrame) -> None:
        """Add bars of ``symbol`` that are newer than its last one."""
        last = self.bars(tf, symbol, n=1)
        first = _normalize(rows).index.min() if len(rows) else None
        if len(last) and first is not None and first <= last.index[-1]:
            raise ValueError(f"append: {first} is not after the last bar {last.index[-1]}")
        self.upsert(tf, symbol, rows)

    @classmethod
    def synthetic(
        cls,
        symbols: int | Sequence[str] = 8,
        n_bars: int = 300,
        timeframes: Sequence[str] = ("1m", "5m"),
        seed: int = 0,
        end: str | pd.Timestamp = "2024-01-02 16:00",
        empty: Sequence[str] = (),
    ) -> FrameSource:
        """Return a source with seeded random-walk bars (``empty`` symbols are listed, bar-less).

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=5, empty=["NEW"])
        >>> src.symbols(), len(src.bars("5m", "BBB")), len(src.bars("1m", "NEW"))
        (['AAA', 'BBB', 'NEW'], 5, 0)
        """
        names = ([f"SYM{i:02d}" for i in range(symbols)] if isinstance(symbols, int)
                 else list(symbols))
        rng = np.random.default_rng(seed)
        sectors = ("Technology", "Energy", "Financials", "Health Care")
        end_ns = pd.Timestamp(end).value
        frames = {}
        for tf in timeframes:
            step = TIMEFRAMES[tf]
            opens = (end_ns // step) * step - step * np.arange(n_bars)[::-1]
            times = opens.view("datetime64[ns]")
            parts = []
            for i, sym in enumerate(names):
                close = (10.0 * (i + 1)) * np.exp(np.cumsum(rng.normal(0, 0.004, n_bars)))
                open_ = np.r_[close[0], close[:-1]]
                spread = np.abs(rng.normal(0, 0.002, n_bars)) * close
                volume = rng.integers(100, 5000, n_bars).astype("float64")
                parts.append(pd.DataFrame({
                    "time": times, "symbol": sym, "open": open_,
                    "high": np.maximum(open_, close) + spread,
                    "low": np.minimum(open_, close) - spread,
                    "close": close, "volume": volume, "trades": rng.integers(1, 80, n_bars),
                    "vwap": (open_ + close) / 2,
                }))
            frames[tf] = pd.concat(parts, ignore_index=True)
        meta = {s: {"sector": sectors[i % len(sectors)], "name": f"{s} Corp", "exchange": "SIM"}
                for i, s in enumerate(names)}
        return cls(frames, meta=meta, symbols=names + [s for s in empty if s not in names],
                   feed="synthetic")

    def tick(self, rng: np.random.Generator, new_bar: bool = False) -> None:
        """Move every symbol's last bar by one random trade; with ``new_bar``, open a new bar.

        Bars advance in simulated time (one timeframe per new bar), so a demo shows new bars
        every few ticks instead of once a minute.
        """
        for tf in self.timeframes():
            for sym in self.symbols():
                last = self.bars(tf, sym, n=1)
                if last.empty:
                    continue
                bar = last.iloc[-1]
                price = float(bar["close"]) * float(np.exp(rng.normal(0, 0.002)))
                size = float(rng.integers(1, 200))
                if new_bar:
                    time = last.index[-1] + pd.Timedelta(TIMEFRAMES[tf], "ns")
                    row = {"open": price, "high": price, "low": price, "close": price,
                           "volume": size, "trades": 1, "vwap": price}
                else:
                    time = last.index[-1]
                    volume = float(bar["volume"]) + size
                    row = {"open": float(bar["open"]), "high": max(float(bar["high"]), price),
                           "low": min(float(bar["low"]), price), "close": price,
                           "volume": volume, "trades": int(bar["trades"]) + 1,
                           "vwap": (float(bar["vwap"]) * float(bar["volume"]) + price * size)
                           / volume}
                self.upsert(tf, sym, pd.DataFrame(row, index=pd.DatetimeIndex([time], name="time")))

    def simulate(self, period: float = 0.3, bar_every: int = 4, seed: int = 0) -> threading.Event:
        """Tick every ``period`` seconds in a daemon thread, opening a new bar every
        ``bar_every`` ticks; set the returned event to stop."""
        stop = threading.Event()
        rng = np.random.default_rng(seed)

        def run() -> None:
            count = 0
            while not stop.wait(period):
                count += 1
                self.tick(rng, new_bar=count % bar_every == 0)

        threading.Thread(target=run, name="frame-source-simulate", daemon=True).start()
        return stop


def _rule_dict(rule: Rule) -> dict:
    return {"id": rule.id, "text": rule.text, "kind": rule.kind, "symbol": rule.symbol,
            "tf": rule.tf}


def _quality_dataset(components: Mapping[str, np.ndarray], time: np.ndarray, dim: str,
                     labels: np.ndarray) -> xr.Dataset:
    """Return ``score`` and every component over ``time × dim`` (components not given are
    clean), the score combined with the flow's weights, as float32 like the flow's."""
    shape = (len(time), len(labels))
    values = {c: np.broadcast_to(components.get(c, 100.0), shape).astype(np.float32)
              for c in COMPONENTS}
    score = np.clip(100.0 - sum(WEIGHTS[c] * (100.0 - values[c]) for c in COMPONENTS), 0, 100)
    data = {"score": score.astype(np.float32), **values}
    return xr.Dataset({k: (("time", dim), v, QUALITY_ATTRS.get(k, {})) for k, v in data.items()},
                      coords={"time": np.asarray(time, dtype="datetime64[ns]"), dim: labels})


_default: BarSource | None = None
_default_lock = threading.Lock()


def default_source() -> BarSource:
    """Return the process-wide source for ``panel serve dashboards/app.py`` (created once).

    Uses ``flows.pipeline.default_flow()`` (a running flow) when that module exists;
    otherwise falls back to a simulated :class:`FrameSource` and logs a note. Living in an
    imported module, the singleton outlives sessions (Bokeh clears an app script's globals).
    """
    global _default
    with _default_lock:
        if _default is None:
            try:
                from flows.pipeline import default_flow
            except ImportError as exc:
                if exc.name != "flows.pipeline":
                    raise  # the module exists but is broken: do not hide that
                log.warning("flows.pipeline.default_flow is not available (%s); "
                            "serving simulated in-memory bars instead", exc)
                source = FrameSource.synthetic(20, n_bars=300)
                source.simulate()
                _default = source
            else:
                _default = default_flow()
        return _default


__all__ = ["ALERT_COLUMNS", "BAR_COLUMNS", "BREADTH_VARIABLES", "HEATMAP_COLUMNS",
           "QUARANTINE_COLUMNS", "SECTOR_VARIABLES", "BarSource", "FrameSource", "MarketSource",
           "default_source", "empty_bars"]
