"""Data quality: an explainable 0-100 score per symbol and per feed for every bar.

The score is built from named components. Each component is its own 0-100 sub-score
(100 = clean), stored next to the score, so a reader sees what lowered it:

==================  ==========================================================  ===========
component           what it measures in a (bar, symbol) cell                    zero at
==================  ==========================================================  ===========
``rejected``        received trades that validation quarantined (bad price,     10 %
                    size or time) / received trades
``duplicates``      received trades already seen (same symbol and trade id)     10 %
                    / received trades
``late``            (late + ``too_late_factor`` x too_late) / accepted trades;  10 %
                    late = older than the open bar but amending a bar inside
                    the window, too late = older than the window (lost to bars)
``staleness``       0 when the symbol has no trade in the bar while the time    binary
                    since its last trade exceeds ``stale_k`` x its normal gap
``spike``           accepted trades whose price is more than ``spike_k``        2 %
                    robust deviations from the median of the symbol's recent
                    prices / accepted trades
``volume_outlier``  accepted trades whose log size is more than ``volume_k``    2 %
                    robust deviations above the median of recent log sizes
``ohlc``            0 when the bar breaks ``low <= open, close <= high``,       binary
                    ``low <= vwap <= high`` or ``volume > 0`` where ``trades > 0``
``id_gaps``         missing trade ids / (missing + accepted trades with ids),   10 %
                    only for symbols whose ids are sequential (learned online)
==================  ==========================================================  ===========

A share-based component is ``100 * max(0, 1 - share / tolerance)`` ("zero at" is the tolerance);
a binary one is 0 or 100. The score is ::

    score = clip(100 - sum_c weight_c * (100 - component_c), 0, 100)

with the weights of :data:`WEIGHTS` (``ohlc`` 1.0; ``rejected``, ``spike``, ``id_gaps``,
``staleness`` 0.5; ``duplicates``, ``late``, ``volume_outlier`` 0.25): one fully failed
component at weight 0.5 halves the score, a broken bar alone zeroes it. Clean data scores
exactly 100 in every component, and so does a cell where nothing happened.

Robust deviation: ``|x - median| / max(1.4826 * MAD, floor)`` over the symbol's last
``ring`` accepted trades (before the batch), with a floor of ``spike_min_rel * median`` for
prices and ``volume_min_log`` for log sizes, so a quiet tape (MAD 0) does not make every
tick a spike. Spikes and volume outliers are soft anomalies: they are flagged (a record per
trade, see :class:`QualityFlags`) and stay in the bars, as exchanges keep them; with
``quarantine_spikes`` :meth:`QualityEngine.observe` also returns the mask of accepted trades
to move to the quarantine instead.

Which bar an event is charged to: the bar of its event time while that bar can still change
(inside the window of :class:`flows.bars.BarConfig`); events with no usable event time
(``bad_time``, ``future_time``, unparsable payloads) or older than the window (``too_late``)
are charged to the open bar when they arrived -- the feed delivered them then -- so quality
rows older than the window never change. Records without a symbol (unparsable, unknown
symbol) count towards their feed's score only.

Normal gap (staleness): ``H * (1 - exp(-T/H)) / (S - exp(-T/H))`` where ``S`` is the symbol's
trade count decayed with half-life-like horizon ``H = stale_horizon_s`` and ``T`` the time since
its first trade: the mean time between trades over roughly the last ``H`` (bias-corrected
while younger). Time-weighted, so a burst of trades does not shrink it the way an average of
per-trade gaps would. A symbol is judged only after ``stale_min_trades`` trades.

Id gaps: a symbol's ids are sequential once at least ``seq_min_pairs`` consecutive ids (in id
order, as the high-water mark advances) were seen and more than half of them differ by exactly
one. A jump of the high-water mark by ``d > 1`` counts ``d - 1`` missing ids against the trade
that revealed it; an id that arrives later inside a counted gap (a late trade) takes its count
back while that bar is inside the window.

Per feed, the same components are computed from the feed's summed counts (records without a
symbol included); ``staleness`` and ``ohlc`` are ``100 * max(0, 1 - share / 10 %)`` of the
feed's symbols stale / of its bars broken in that row.

Store layout (the lead's ``store.py`` writes these groups)::

    quality/{tf}        dims (time, symbol): score rejected duplicates late staleness spike
                        volume_outlier ohlc id_gaps   (float32, 0-100)
    quality_feed/{tf}   dims (time, feed):   the same variables per feed

The time axis holds the bar rows plus any bar in which only rejected records arrived.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import xarray as xr

from flows.schema import NO_ID, NS, REASONS, TIMEFRAMES, Quarantine, TradeBatch

MINUTE = TIMEFRAMES["1m"]

#: Components in store order.
COMPONENTS: tuple[str, ...] = ("rejected", "duplicates", "late", "staleness", "spike",
                               "volume_outlier", "ohlc", "id_gaps")
#: Default weight of each component in the score.
WEIGHTS: Mapping[str, float] = MappingProxyType({
    "rejected": 0.5, "duplicates": 0.25, "late": 0.25, "staleness": 0.5, "spike": 0.5,
    "volume_outlier": 0.25, "ohlc": 1.0, "id_gaps": 0.5})
#: Default share at which a share-based component reaches 0.
TOLERANCES: Mapping[str, float] = MappingProxyType({
    "rejected": 0.10, "duplicates": 0.10, "late": 0.10, "spike": 0.02, "volume_outlier": 0.02,
    "id_gaps": 0.10, "staleness": 0.10, "ohlc": 0.10})  # the last two: per-feed shares
#: Reasons of :class:`QualityFlags` records.
FLAG_REASONS: tuple[str, ...] = ("spike", "volume_outlier", "id_gap")

QUALITY_ATTRS = {
    "score": {"long_name": "data quality score", "units": "0-100",
              "formula": "clip(100 - sum(weight_c * (100 - c)), 0, 100)"},
    "rejected": {"long_name": "100 x (1 - share of received trades quarantined / tolerance)"},
    "duplicates": {"long_name": "100 x (1 - share of received trades duplicated / tolerance)"},
    "late": {"long_name": "100 x (1 - (late + factor x too_late) / accepted / tolerance)"},
    "staleness": {"long_name": "0 when no trade for longer than k x the symbol's normal gap"},
    "spike": {"long_name": "100 x (1 - share of accepted trades that are price spikes / tolerance)"},
    "volume_outlier": {"long_name": "100 x (1 - share of accepted trades with outlier size / tolerance)"},
    "ohlc": {"long_name": "0 when the bar breaks an OHLC/vwap/volume invariant"},
    "id_gaps": {"long_name": "100 x (1 - missing ids / (missing + ids seen) / tolerance)"},
}

# Counters per (row, symbol) and per (row, feed).
_RECEIVED, _ACCEPTED, _REJECTED, _LATE, _TOO_LATE, _SPIKE, _OUTLIER, _MISSING, _WITH_ID = range(9)
_N_COUNTERS = 9
_TOO_LATE_REASON = REASONS.index("too_late")
_UNTIMED_REASONS = np.array([REASONS.index(r) for r in ("bad_time", "future_time", "malformed",
                                                         "missing_field")], dtype=np.int8)


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the quality score (see the module docstring for the definitions).

    Parameters
    ----------
    window : minutes of bars late trades may amend; must equal the bar engine's ``window``.
    history : rows per timeframe kept in memory at most (rows the bars dropped go too).
    weights, tolerances : per component, see :data:`WEIGHTS` / :data:`TOLERANCES`.
    too_late_factor : weight of a too-late trade against a late one in ``late``.
    ring : recent accepted trades per symbol that spikes and outliers are measured against.
    min_history : trades a symbol needs in its ring before it is checked for spikes.
    spike_k, spike_min_rel : spike threshold in robust deviations; floor of the deviation as a
        share of the median price.
    volume_k, volume_min_log : the same for log sizes (one-sided: only large trades).
    quarantine_spikes : return spikes (not volume outliers) as a mask to quarantine.
    stale_k, stale_horizon_s, stale_min_trades : staleness threshold in normal gaps, the
        horizon of the normal gap, trades needed before a symbol is judged.
    seq_min_pairs : consecutive id pairs needed before a symbol's ids count as sequential.

    Examples
    --------
    >>> QualityConfig(spike_k=6).weights["ohlc"]
    1.0
    >>> QualityConfig(weights={"spike": 2.0}).weights["spike"], QualityConfig().weights["late"]
    (2.0, 0.25)
    """

    window: int = 120
    history: int = 500
    weights: Mapping[str, float] = field(default_factory=lambda: dict(WEIGHTS))
    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCES))
    too_late_factor: float = 5.0
    ring: int = 50
    min_history: int = 20
    spike_k: float = 8.0
    spike_min_rel: float = 0.01
    volume_k: float = 6.0
    volume_min_log: float = 1.0
    quarantine_spikes: bool = False
    stale_k: float = 10.0
    stale_horizon_s: float = 1800.0
    stale_min_trades: int = 20
    seq_min_pairs: int = 20

    def __post_init__(self) -> None:
        for name, given, default in (("weights", self.weights, WEIGHTS),
                                     ("tolerances", self.tolerances, TOLERANCES)):
            unknown = set(given) - set(default)
            if unknown:
                raise ValueError(f"unknown quality component in {name}: {sorted(unknown)[0]!r}")
            merged = {**default, **given}
            if any(not v >= 0 for v in merged.values()) or (name == "tolerances" and min(merged.values()) <= 0):
                raise ValueError(f"quality {name} must be positive")
            object.__setattr__(self, name, MappingProxyType(merged))
        if self.window < 1 or self.history <= self.window:
            raise ValueError("quality window must be >= 1 and history must exceed it")
        if self.ring < 3 or not 1 <= self.min_history <= self.ring:
            raise ValueError("quality ring must be >= 3 and min_history within 1..ring")
        if min(self.spike_k, self.volume_k, self.stale_k, self.stale_horizon_s) <= 0:
            raise ValueError("quality thresholds must be positive")


@dataclass
class QualityFlags:
    """Flagged trades: one record per soft anomaly or id gap, with its reason.

    ``reason`` indexes :data:`FLAG_REASONS`; ``detail`` is the robust deviation for ``spike``
    and ``volume_outlier`` and the number of missing ids for ``id_gap`` (the trade is the one
    after the gap).
    """

    time: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    symbol: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    trade_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    price: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    size: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    reason: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    detail: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))

    COLUMNS = ("time", "symbol", "trade_id", "price", "size", "reason", "detail")

    def __len__(self) -> int:
        return len(self.reason)

    @classmethod
    def of(cls, batch: TradeBatch, index: np.ndarray, reason: str, detail: np.ndarray) -> "QualityFlags":
        n = len(index)
        return cls(batch.time[index], batch.symbol[index], batch.trade_id[index], batch.price[index],
                   batch.size[index], np.full(n, FLAG_REASONS.index(reason), np.int8),
                   np.asarray(detail, dtype=np.float64))

    @classmethod
    def concat(cls, parts: Sequence["QualityFlags"]) -> "QualityFlags":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in cls.COLUMNS))

    def counts(self) -> dict[str, int]:
        """Return the number of records per reason name."""
        c = np.bincount(self.reason.astype(np.int64), minlength=len(FLAG_REASONS))
        return {FLAG_REASONS[i]: int(c[i]) for i in range(len(FLAG_REASONS)) if c[i]}


@dataclass
class QualityReport:
    """What :meth:`QualityEngine.observe` found in one batch.

    ``quarantine`` is None unless ``quarantine_spikes`` is set; then it is a mask over the
    accepted batch of the spikes to move to the quarantine (instead of the bars).
    """

    flags: QualityFlags
    quarantine: np.ndarray | None = None


def _grow_cols(a: np.ndarray, n: int, fill) -> np.ndarray:
    if a.shape[-1] >= n:
        return a
    out = np.full(a.shape[:-1] + (n,), fill, dtype=a.dtype)
    out[..., : a.shape[-1]] = a
    return out


def _row_median(a: np.ndarray) -> np.ndarray:
    """Median of each row, ignoring NaN (rings not yet full); no row is all NaN."""
    if not np.isnan(a).any():
        return np.median(a, axis=1)
    return np.nanmedian(a, axis=1)


class _Grid:
    """Counters of one timeframe per (row, symbol) and (row, feed), rows keyed by bar time."""

    def __init__(self, tf: str):
        self.tf_ns = TIMEFRAMES[tf]
        self.times = np.empty(0, np.int64)
        self.counts = np.zeros((_N_COUNTERS, 0, 0), np.int64)
        self.feed_counts = np.zeros((_N_COUNTERS, 0, 0), np.int64)
        self.last = np.zeros((0, 0), np.int64)  # newest accepted trade time in the cell, 0 none
        self.stale = np.zeros((0, 0), bool)
        self.broken = np.zeros((0, 0), bool)
        self.base_last = np.zeros(0, np.int64)  # newest trade time in rows dropped from the front
        self.changed_from: int | None = None

    def touch(self, t: int) -> None:
        self.changed_from = t if self.changed_from is None else min(self.changed_from, t)

    def widen(self, n_sym: int, n_feed: int) -> None:
        self.counts = _grow_cols(self.counts, n_sym, 0)
        self.last = _grow_cols(self.last, n_sym, 0)
        self.stale = _grow_cols(self.stale, n_sym, False)
        self.broken = _grow_cols(self.broken, n_sym, False)
        self.base_last = _grow_cols(self.base_last, n_sym, 0)
        self.feed_counts = _grow_cols(self.feed_counts, n_feed, 0)

    def rows_for(self, buckets: np.ndarray) -> np.ndarray:
        """Return the row of each bucket time, inserting rows for new ones."""
        ub = np.unique(buckets)
        new = np.setdiff1d(ub, self.times, assume_unique=True)
        if len(new):
            merged = np.union1d(self.times, new)
            old_rows = np.searchsorted(merged, self.times)
            for name in ("counts", "feed_counts", "last", "stale", "broken"):
                a = getattr(self, name)
                b = np.zeros(a.shape[:-2] + (len(merged), a.shape[-1]), a.dtype)
                b[..., old_rows, :] = a
                setattr(self, name, b)
            self.times = merged
        return np.searchsorted(self.times, buckets)

    def drop_before(self, t: int) -> None:
        drop = int(np.searchsorted(self.times, t))
        if drop <= 0:
            return
        np.maximum(self.base_last, self.last[:drop].max(axis=0), out=self.base_last)
        self.times = self.times[drop:]
        for name in ("counts", "feed_counts"):
            setattr(self, name, getattr(self, name)[:, drop:].copy())
        for name in ("last", "stale", "broken"):
            setattr(self, name, getattr(self, name)[drop:].copy())


class QualityEngine:
    """Per-symbol and per-feed quality scores of every timeframe, from the flow's batches.

    Parameters
    ----------
    config : thresholds, weights and the bars' window.
    timeframes : the bar engine's timeframes.

    Call :meth:`observe` for every batch after validation and before the bar engine (cheap,
    vectorized), :meth:`update` with each timeframe's bar rows when analytics refresh, and read
    :meth:`dataset` / :meth:`feed_dataset`.

    Examples
    --------
    >>> from flows.schema import NS, SymbolTable
    >>> from flows.validate import Validator
    >>> table, v = SymbolTable(), Validator(clock=lambda: 10**6 * NS)
    >>> q = QualityEngine(QualityConfig(), ("1m",))
    >>> b = TradeBatch.from_columns(table, time=[60 * NS] * 4, symbol=["A", "A", "A", "B"],
    ...     price=[10.0, float("nan"), 10.0, 5.0], size=[1.0] * 4, trade_id=[1, 2, 1, 7])
    >>> ok, bad = v.process(b)
    >>> _ = q.observe(b, ok, bad)
    >>> ds = q.dataset("1m", table.names)
    >>> ds.rejected.values.tolist(), ds.duplicates.values.tolist(), ds.score.values.tolist()
    ([[0.0, 100.0]], [[0.0, 100.0]], [[25.0, 100.0]])
    """

    def __init__(self, config: QualityConfig | None = None, timeframes: Sequence[str] = tuple(TIMEFRAMES)):
        self.config = c = config or QualityConfig()
        self.grids = {tf: _Grid(tf) for tf in timeframes}
        #: feed names in order of first appearance (the ``feed`` axis)
        self.feeds: list[str] = []
        #: newest 1m bar time seen (the open bar), as the bar engine tracks it
        self.open_minute: int | None = None
        self.newest = 0  # newest accepted event time
        s = 0
        self.symbol_feed = np.zeros(s, np.int64)
        # Rings of recent prices and log sizes per symbol, and how many were ever put in.
        self.ring_price = np.full((s, c.ring), np.nan)
        self.ring_logsize = np.full((s, c.ring), np.nan)
        self.ring_n = np.zeros(s, np.int64)
        # Normal gap: newest trade time, decayed sums of gaps and squared gaps, trades.
        self.last_time = np.zeros(s, np.int64)
        self.gap_sum = np.zeros(s)
        self.gap_sq_sum = np.zeros(s)
        self.n_trades = np.zeros(s, np.int64)
        # Trade ids: high-water mark, consecutive pairs seen and those differing by one.
        self.id_hwm = np.full(s, NO_ID, np.int64)
        self.id_pairs = np.zeros(s, np.int64)
        self.id_unit = np.zeros(s, np.int64)
        #: open id gaps per symbol: [first missing, last missing, charge time]
        self.gaps: dict[int, list[list[int]]] = {}
        self._pending: list[tuple] = []  # events before the first accepted trade

    # -- observing batches ------------------------------------------------------------------

    def _symbols(self, n: int) -> None:
        if n <= len(self.ring_n):
            return
        n = max(n, len(self.ring_n) + len(self.ring_n) // 4)
        self.symbol_feed = _grow_cols(self.symbol_feed, n, 0)
        self.ring_price = _grow_cols(self.ring_price.T, n, np.nan).T.copy()
        self.ring_logsize = _grow_cols(self.ring_logsize.T, n, np.nan).T.copy()
        for name in ("ring_n", "last_time", "n_trades", "id_pairs", "id_unit", "gap_sum", "gap_sq_sum"):
            setattr(self, name, _grow_cols(getattr(self, name), n, 0))
        self.id_hwm = _grow_cols(self.id_hwm, n, NO_ID)

    def _feed(self, name: str) -> int:
        if name not in self.feeds:
            self.feeds.append(name)
        return self.feeds.index(name)

    def observe(self, received: TradeBatch, accepted: TradeBatch, quarantine: Quarantine,
                feed: str = "default", unparsed: Quarantine | None = None) -> QualityReport:
        """Count one batch: what arrived, what validation did, and anomalies in what it kept.

        Parameters
        ----------
        received : the batch as it reached validation.
        accepted, quarantine : :meth:`flows.validate.Validator.process` of ``received``
            (``received - accepted - quarantine`` are the duplicates).
        feed : the source's name (the ``feed`` axis).
        unparsed : records the feed could not parse into trades (counted for the feed only).

        Returns flagged trades and, with ``quarantine_spikes``, the mask of ``accepted`` trades
        to quarantine (the bar engine must then get ``accepted.take(~mask)``).
        """
        c = self.config
        f = self._feed(feed)
        n_sym = 1 + max(int(received.symbol.max(initial=-1)), int(accepted.symbol.max(initial=-1)))
        self._symbols(n_sym)
        if len(accepted):
            self.symbol_feed[np.unique(accepted.symbol)] = f
        spike, spike_z, outlier, outlier_z = self._soft_anomalies(accepted)
        flags = [QualityFlags.of(accepted, np.flatnonzero(spike), "spike", spike_z[spike]),
                 QualityFlags.of(accepted, np.flatnonzero(outlier), "volume_outlier", outlier_z[outlier])]
        to_bars = ~spike if c.quarantine_spikes else np.ones(len(accepted), bool)
        late, too_late, open_before = self._lateness(accepted.time[to_bars])
        if self.open_minute is None:  # nothing accepted yet: charge to the first open bar
            self._pending.append(self._events(received, accepted, quarantine, accepted.take(to_bars), late, too_late,
                                              spike, outlier, np.zeros(len(accepted), np.int64), unparsed) + (f,))
            return QualityReport(QualityFlags.concat(flags), spike if c.quarantine_spikes else None)
        lo = (open_before if open_before is not None else self.open_minute) - (c.window - 1) * MINUTE
        kept = accepted.take(to_bars)
        in_bars = ~too_late
        self._learn_gaps(kept.symbol[in_bars], kept.time[in_bars])
        missing, id_flags, refills = self._id_gaps(accepted)
        flags.append(id_flags)
        self._charge(self._events(received, accepted, quarantine, kept, late, too_late, spike,
                                  outlier, missing, unparsed), lo, f,
                     kept.time[in_bars], kept.symbol[in_bars])
        for sym, trade_id in refills:
            self._refill(sym, trade_id)
        self._expire_gaps(lo)
        return QualityReport(QualityFlags.concat(flags), spike if c.quarantine_spikes else None)

    @staticmethod
    def _events(received, accepted, quarantine, kept, late, too_late, spike, outlier, missing,
                unparsed) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The batch's counts as events: (event time, symbol, counter, weight) arrays."""
        parts = [(_RECEIVED, received.time, received.symbol, None),
                 (_ACCEPTED, accepted.time, accepted.symbol, None),
                 (_REJECTED, quarantine.time, quarantine.symbol, None),
                 (_LATE, kept.time[late], kept.symbol[late], None),
                 (_TOO_LATE, kept.time[too_late], kept.symbol[too_late], None),
                 (_SPIKE, accepted.time[spike], accepted.symbol[spike], None),
                 (_OUTLIER, accepted.time[outlier], accepted.symbol[outlier], None),
                 (_MISSING, accepted.time, accepted.symbol, missing),
                 (_WITH_ID, accepted.time, accepted.symbol, (accepted.trade_id >= 0).astype(np.int64))]
        if unparsed is not None and len(unparsed):
            parts += [(_RECEIVED, unparsed.time, unparsed.symbol, None),
                      (_REJECTED, unparsed.time, unparsed.symbol, None)]
        return (np.concatenate([t for _, t, _, _ in parts]),
                np.concatenate([s for _, _, s, _ in parts]).astype(np.int64),
                np.concatenate([np.full(len(t), k, np.int64) for k, t, _, _ in parts]),
                np.concatenate([np.ones(len(t), np.int64) if w is None else w for _, t, _, w in parts]))

    def _charge(self, events: tuple[np.ndarray, ...], lo: int, f: int, kept_t: np.ndarray,
                kept_s: np.ndarray) -> None:
        """Add events to every timeframe's counters, at their own bar while it is in the window
        (``lo`` to the open bar), else at the open bar; note the newest trade per cell."""
        for *pending, pf in self._pending:  # events from before the first accepted trade
            self._charge_at(pending, np.full(len(pending[0]), self.open_minute), pf)
        self._pending = []
        times = events[0]
        minute = times - times % MINUTE
        own = (minute >= lo) & (minute <= self.open_minute)
        self._charge_at(events, np.where(own, times, self.open_minute), f)
        kept_s = kept_s.astype(np.int64)
        for grid in self.grids.values():
            if len(kept_t):  # their bars are in the window, so these rows exist
                krow = np.searchsorted(grid.times, kept_t - kept_t % grid.tf_ns)
                np.maximum.at(grid.last, (krow, kept_s), kept_t)

    def _charge_at(self, events: Sequence[np.ndarray], charge: np.ndarray, f: int) -> None:
        _, syms, counters, weights = events
        n_sym = len(self.ring_n)
        has_sym = syms >= 0
        for grid in self.grids.values():
            grid.widen(n_sym, len(self.feeds))
            rows = grid.rows_for(charge - charge % grid.tf_ns)
            ur, local = np.unique(rows, return_inverse=True)
            u = len(ur)
            flat = (counters * u + local) * n_sym + syms
            cells = np.bincount(flat[has_sym], weights[has_sym], minlength=_N_COUNTERS * u * n_sym)
            grid.counts[:, ur, :n_sym] += cells.reshape(_N_COUNTERS, u, n_sym).astype(np.int64)
            per_feed = np.bincount(counters * u + local, weights, minlength=_N_COUNTERS * u)
            grid.feed_counts[:, ur, f] += per_feed.reshape(_N_COUNTERS, u).astype(np.int64)
            if u:
                grid.touch(int(grid.times[ur[0]]))

    def _lateness(self, time: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
        """Late and too-late masks by the bar engine's rule (running open bar); advance it."""
        open_before = self.open_minute
        n = len(time)
        if n == 0:
            return np.zeros(0, bool), np.zeros(0, bool), open_before
        minute = time - time % MINUTE
        before = np.empty(n, np.int64)
        before[0] = open_before if open_before is not None else minute[0]
        if n > 1:
            np.maximum(np.maximum.accumulate(minute)[:-1], before[0], out=before[1:])
        self.open_minute = max(int(minute.max()), int(before[0]))
        too_late = minute < before - (self.config.window - 1) * MINUTE
        late = (minute < before) & ~too_late
        self.newest = max(self.newest, int(time[~too_late].max(initial=0)))
        return late, too_late, open_before

    def _soft_anomalies(self, batch: TradeBatch) -> tuple[np.ndarray, ...]:
        """Spike and volume-outlier masks (and robust deviations) against the rings; fill them."""
        c = self.config
        n = len(batch)
        spike, outlier = np.zeros(n, bool), np.zeros(n, bool)
        spike_z, outlier_z = np.zeros(n), np.zeros(n)
        if n == 0:
            return spike, spike_z, outlier, outlier_z
        sym = batch.symbol.astype(np.int64)
        logsize = np.log(batch.size)
        us, inverse = np.unique(sym, return_inverse=True)
        ready = self.ring_n[us] >= c.min_history
        if ready.any():
            judged = us[ready]
            pos = np.full(len(us), -1)
            pos[ready] = np.arange(len(judged))
            j = pos[inverse]
            check = j >= 0
            for ring, value, k, floor, one_sided, mask, z in (
                    (self.ring_price, batch.price, c.spike_k, None, False, spike, spike_z),
                    (self.ring_logsize, logsize, c.volume_k, c.volume_min_log, True, outlier, outlier_z)):
                window = ring[judged]
                med = _row_median(window)
                mad = _row_median(np.abs(window - med[:, None]))
                scale = np.maximum(1.4826 * mad, c.spike_min_rel * np.abs(med) if floor is None else floor)
                dev = value[check] - med[j[check]]
                dev = dev if one_sided else np.abs(dev)
                z[check] = dev / scale[j[check]]
                mask[check] = z[check] > k
        # Put the batch into the rings: per symbol its last `ring` trades, in arrival order.
        order = np.argsort(sym, kind="stable")
        s_sorted = sym[order]
        starts = np.searchsorted(s_sorted, us)
        counts = np.bincount(inverse, minlength=len(us))
        rank = np.arange(n) - np.repeat(starts, counts)
        keep = rank >= np.repeat(counts, counts) - c.ring
        idx, s_k, r_k = order[keep], s_sorted[keep], rank[keep]
        slot = (self.ring_n[s_k] + r_k) % c.ring
        self.ring_price[s_k, slot] = batch.price[idx]
        self.ring_logsize[s_k, slot] = logsize[idx]
        self.ring_n[us] += counts
        return spike, spike_z, outlier, outlier_z

    def _learn_gaps(self, sym: np.ndarray, time: np.ndarray) -> None:
        """Fold trades' gaps into each symbol's decayed sums of gap and squared gap."""
        new = time > self.last_time[sym]  # late trades close no gap
        sym, time = sym[new].astype(np.int64), time[new]
        if len(sym) == 0:
            return
        order = np.lexsort((time, sym))
        s, t = sym[order], time[order]
        first = np.ones(len(s), bool)
        first[1:] = s[1:] != s[:-1]
        prev = np.empty(len(s), np.int64)
        prev[1:] = t[:-1]
        prev[first] = self.last_time[s[first]]
        gap = np.where(prev > 0, t - prev, 0).astype(np.float64)
        last = np.append(np.flatnonzero(first)[1:] - 1, len(s) - 1)
        us, t_new = s[last], t[last]
        h = self.config.stale_horizon_s * NS
        decay = np.exp(-(t_new - self.last_time[us]) / h)
        self.gap_sum[us] *= decay
        self.gap_sq_sum[us] *= decay
        w = np.exp(-(np.repeat(t_new, np.diff(np.append(np.flatnonzero(first), len(s)))) - t) / h)
        np.add.at(self.gap_sum, s, w * gap)
        np.add.at(self.gap_sq_sum, s, w * gap * gap)
        self.last_time[us] = t_new
        self.n_trades[us] += np.diff(np.append(np.flatnonzero(first), len(s)))

    def normal_gap(self) -> np.ndarray:
        """Each symbol's normal gap between trades (ns; NaN before ``stale_min_trades``)."""
        armed = (self.n_trades >= self.config.stale_min_trades) & (self.gap_sum > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(armed, self.gap_sq_sum / self.gap_sum, np.nan)

    def _id_gaps(self, accepted: TradeBatch) -> tuple[np.ndarray, QualityFlags, list]:
        """Missing ids revealed by each accepted trade; learn which symbols are sequential."""
        c = self.config
        missing = np.zeros(len(accepted), np.int64)
        has = np.flatnonzero(accepted.trade_id >= 0)
        if len(has) == 0:
            return missing, QualityFlags(), []
        sym = accepted.symbol[has].astype(np.int64)
        ids = accepted.trade_id[has]
        sequential = (self.id_pairs >= c.seq_min_pairs) & (2 * self.id_unit > self.id_pairs)
        hwm = self.id_hwm[sym]
        above = ids > hwm
        refills = []
        below = np.flatnonzero(~above)
        for i in below[np.isin(sym[below], list(self.gaps))] if self.gaps else ():
            refills.append((int(sym[i]), int(ids[i])))
        adv = np.flatnonzero(above)
        order = adv[np.lexsort((ids[adv], sym[adv]))]
        s, v = sym[order], ids[order]
        prev = np.empty(len(order), np.int64)
        prev[1:] = v[:-1]
        first = np.ones(len(order), bool)
        first[1:] = s[1:] != s[:-1]
        prev[first] = hwm[order][first]
        paired = prev >= 0
        diff = v - prev
        np.add.at(self.id_pairs, s[paired], 1)
        np.add.at(self.id_unit, s[paired & (diff == 1)], 1)
        gap = paired & (diff > 1) & sequential[s]
        where = has[order[gap]]
        missing[where] = diff[gap] - 1
        np.maximum.at(self.id_hwm, s, v)
        for i, d in zip(np.flatnonzero(gap), diff[gap]):  # gaps are rare where ids are sequential
            self.gaps.setdefault(int(s[i]), []).append([int(prev[i]) + 1, int(v[i]) - 1,
                                                        int(accepted.time[has[order[i]]])])
        flags = QualityFlags.of(accepted, where, "id_gap", missing[where])
        return missing, flags, refills

    def _refill(self, sym: int, trade_id: int) -> None:
        """An id inside a counted gap arrived (late): take its count back from the gap's bar."""
        for gap in self.gaps.get(sym, []):
            if gap[0] <= trade_id <= gap[1]:
                charged = gap[2]
                if gap[0] == gap[1]:
                    self.gaps[sym].remove(gap)
                elif trade_id == gap[0]:
                    gap[0] += 1
                elif trade_id == gap[1]:
                    gap[1] -= 1
                else:
                    self.gaps[sym].append([trade_id + 1, gap[1], charged])
                    gap[1] = trade_id - 1
                for grid in self.grids.values():
                    bucket = charged - charged % grid.tf_ns
                    row = int(np.searchsorted(grid.times, bucket))
                    if row < len(grid.times) and grid.times[row] == bucket:
                        grid.counts[_MISSING, row, sym] -= 1
                        grid.feed_counts[_MISSING, row, self.symbol_feed[sym]] -= 1
                        grid.touch(bucket)
                return

    def _expire_gaps(self, lo: int) -> None:
        """Forget gaps charged to bars older than the window: their counts are final."""
        for sym in list(self.gaps):
            self.gaps[sym] = [g for g in self.gaps[sym] if g[2] >= lo]
            if not self.gaps[sym]:
                del self.gaps[sym]

    # -- bar rows ---------------------------------------------------------------------------

    def update(self, tf: str, times: np.ndarray, fields: Mapping[str, np.ndarray], start: int = 0) -> None:
        """Judge the bar rows ``start:`` of ``tf``: staleness and OHLC invariants.

        Parameters
        ----------
        times : (R,) int64 bar times of the timeframe's in-memory window, sorted.
        fields : ``open high low close volume vwap`` (R, S) float64 and ``trades`` (R, S).
        start : first row whose bars may have changed since the last call.
        """
        grid = self.grids[tf]
        times = np.asarray(times, dtype=np.int64)
        if len(times) == 0:
            return
        n_sym = int(np.shape(fields["trades"])[1])
        self._symbols(n_sym)
        grid.widen(len(self.ring_n), max(len(self.feeds), 1))
        grid.drop_before(int(times[0]))
        if len(grid.times) > self.config.history:
            grid.drop_before(int(grid.times[len(grid.times) - self.config.history]))
        rows = grid.rows_for(times[start:]) if start < len(times) else np.empty(0, np.int64)
        if len(rows) == 0:
            return
        trades = np.asarray(fields["trades"])[start:]
        o, h, lo, cl, v, vw = (np.asarray(fields[k])[start:] for k in ("open", "high", "low", "close",
                                                                      "volume", "vwap"))
        has = trades > 0
        with np.errstate(invalid="ignore"):
            tol = 1e-9 * np.abs(h)
            ok = ((lo <= o) & (o <= h) & (lo <= cl) & (cl <= h) & (v > 0)
                  & (np.isnan(vw) | ((lo - tol <= vw) & (vw <= h + tol))))
        grid.broken[rows, :n_sym] = has & ~ok
        # Staleness: newest trade up to each row (carried over the grid's rows) vs the normal gap.
        carried = np.maximum.accumulate(np.vstack([grid.base_last[None, :], grid.last]), axis=0)[1:]
        last = carried[rows, :n_sym]
        end = np.minimum(times[start:] + grid.tf_ns, self.newest)[:, None]
        gap = self.normal_gap()[:n_sym]
        with np.errstate(invalid="ignore"):
            grid.stale[rows, :n_sym] = (~has & (last > 0) & (end - last > self.config.stale_k * gap))
        grid.touch(int(times[start]))

    # -- reading ----------------------------------------------------------------------------

    def _components(self, counts: np.ndarray, stale: np.ndarray, broken: np.ndarray,
                    binary_share: bool = False, members: np.ndarray | None = None) -> dict[str, np.ndarray]:
        c = self.config
        tol = c.tolerances
        recv, acc, rej = counts[_RECEIVED], counts[_ACCEPTED], counts[_REJECTED]
        dup = np.maximum(recv - acc - rej, 0)

        def share(num, den, name):
            with np.errstate(invalid="ignore", divide="ignore"):
                s = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
            return (100.0 * np.maximum(0.0, 1.0 - s / tol[name])).astype(np.float32)

        out = {
            "rejected": share(rej, recv, "rejected"),
            "duplicates": share(dup, recv, "duplicates"),
            "late": share(counts[_LATE] + c.too_late_factor * counts[_TOO_LATE], acc, "late"),
            "spike": share(counts[_SPIKE], acc, "spike"),
            "volume_outlier": share(counts[_OUTLIER], acc, "volume_outlier"),
            "id_gaps": share(np.maximum(counts[_MISSING], 0),
                             np.maximum(counts[_MISSING], 0) + counts[_WITH_ID], "id_gaps"),
        }
        if binary_share:
            out["staleness"] = share(stale, members, "staleness")
            out["ohlc"] = share(broken, members, "ohlc")
        else:
            out["staleness"] = np.where(stale, 0.0, 100.0).astype(np.float32)
            out["ohlc"] = np.where(broken, 0.0, 100.0).astype(np.float32)
        penalty = sum(c.weights[k] * (100.0 - out[k].astype(np.float64)) for k in COMPONENTS)
        score = np.clip(100.0 - penalty, 0.0, 100.0).astype(np.float32)
        return {"score": score, **{k: out[k] for k in COMPONENTS}}

    def _first(self, grid: _Grid, since: int | None) -> int:
        return 0 if since is None else int(np.searchsorted(grid.times, since))

    def dataset(self, tf: str, symbols: Sequence[str], since: int | None = None) -> xr.Dataset:
        """Scores of ``tf`` per (time, symbol) from bar time ``since`` (default all in memory).

        ``symbols`` names the symbol codes in order (the flow's ``table.names``).
        """
        grid = self.grids[tf]
        n = len(symbols)
        grid.widen(n, len(self.feeds))
        r0 = self._first(grid, since)
        values = self._components(grid.counts[:, r0:, :n], grid.stale[r0:, :n], grid.broken[r0:, :n])
        data = {k: (("time", "symbol"), v, QUALITY_ATTRS[k]) for k, v in values.items()}
        coords = {"time": ("time", grid.times[r0:].view("datetime64[ns]")),
                  "symbol": ("symbol", np.asarray(list(symbols), dtype=object))}
        return xr.Dataset(data, coords=coords)

    def feed_dataset(self, tf: str, since: int | None = None) -> xr.Dataset:
        """Scores of ``tf`` per (time, feed): the same components over each feed's symbols."""
        grid = self.grids[tf]
        n_feed = len(self.feeds)
        grid.widen(len(self.ring_n), n_feed)
        r0 = self._first(grid, since)
        n_sym = grid.stale.shape[1]
        onehot = np.zeros((n_sym, n_feed), np.int64)
        if n_feed:
            onehot[np.arange(n_sym), self.symbol_feed[:n_sym]] = 1
        seen = self.n_trades[:n_sym] > 0
        members = np.broadcast_to((seen[:, None] * onehot).sum(axis=0), (len(grid.times) - r0, n_feed))
        stale = grid.stale[r0:] @ onehot
        broken = grid.broken[r0:] @ onehot
        values = self._components(grid.feed_counts[:, r0:, :n_feed], stale, broken, True, members)
        data = {k: (("time", "feed"), v, QUALITY_ATTRS[k]) for k, v in values.items()}
        coords = {"time": ("time", grid.times[r0:].view("datetime64[ns]")),
                  "feed": ("feed", np.asarray(self.feeds, dtype=object))}
        return xr.Dataset(data, coords=coords)

    def take_changed(self, tf: str) -> int | None:
        """Earliest bar time of ``tf`` whose scores changed since the last call (and reset)."""
        grid = self.grids[tf]
        out, grid.changed_from = grid.changed_from, None
        return out


__all__ = ["COMPONENTS", "FLAG_REASONS", "QualityConfig", "QualityEngine", "QualityFlags",
           "QualityReport", "TOLERANCES", "WEIGHTS"]
