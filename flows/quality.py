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

Robust deviation: ``|x - median| / max(1.4826 * MAD, floor)`` against the median and MAD of
the symbol's last ``ring`` accepted trades (recomputed every ``ring // 2`` trades), with a floor
of ``spike_min_rel * median`` for prices and ``volume_min_log`` for log sizes, so a quiet tape
(MAD 0) does not make every tick a spike. With the defaults a spike moves at least 8 % from the
recent median in one print, and a volume outlier is at least ``e**6`` (~400) times the median
size: a seeded simulated day with news jumps and bursts raises none. A genuine one-print move
that large (news) is flagged too -- a level shift cannot be told from a bad print without
waiting for the next trades. Spikes and volume outliers are soft anomalies: they are flagged (a record per
trade, see :class:`QualityFlags`) and stay in the bars, as exchanges keep them; with
``quarantine_spikes`` :meth:`QualityEngine.observe` also returns the mask of accepted trades
to move to the quarantine instead.

Which bar an event is charged to: the bar of its event time when that minute lies between the
start of the window (as the batch arrived; the window of :class:`flows.bars.BarConfig`) and the
open bar; any other event -- no usable event time (``bad_time``, ``future_time``, unparsable
payloads), older than the window (``too_late``) -- is charged to the open bar: the feed
delivered it then. The rule depends on the time alone, so a received trade, its quarantine
record or its accepted row always land in the same cell, and quality rows older than the window
never change. Records without a symbol (unparsable, unknown symbol) count towards their feed's
score only. Events before the first accepted trade wait for the first open bar.

Normal gap (staleness): ``sum(w * g**2) / sum(w * g)`` over the symbol's gaps ``g`` between
trades, weighted by ``w = exp(-age / H)``, ``H = stale_horizon_s``: the length of the gap a random
moment falls into (a Poisson tape's is twice its mean gap). Weighting by the gap itself keeps
bursts -- forty trades in three seconds -- from shrinking it, as an average per trade would, and
so keeps bursty, thinly traded symbols from looking stale between bursts. A gap is learned capped
at ``stale_k`` normal gaps (an outage is not a normal gap); a symbol is judged only after
``stale_min_trades`` trades. Each bar row is judged with the normal gap as of the update.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numba
import numpy as np
import xarray as xr

from flows.schema import NO_ID, NS, TIMEFRAMES, Quarantine, TradeBatch

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
                raise ValueError(f"unknown quality component in {name}: {min(unknown)!r}")
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
    def of(cls, batch: TradeBatch, index: np.ndarray, reason: str, detail: np.ndarray) -> QualityFlags:
        n = len(index)
        return cls(batch.time[index], batch.symbol[index], batch.trade_id[index], batch.price[index],
                   batch.size[index], np.full(n, FLAG_REASONS.index(reason), np.int8),
                   np.asarray(detail, dtype=np.float64))

    @classmethod
    def concat(cls, parts: Sequence[QualityFlags]) -> QualityFlags:
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


@numba.njit(cache=True)
def _select(a, n, k):
    """The ``k``-th smallest of ``a[:n]`` (Hoare's quickselect; reorders ``a[:n]`` in place)."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@numba.njit(cache=True)
def _median(a, n):
    """Median of ``a[:n]`` as ``np.median`` gives it (``a[:n]`` is reordered)."""
    upper = _select(a, n, n // 2)
    if n % 2:
        return upper
    lower = a[0]
    for i in range(1, n // 2):  # after selecting n // 2, a[:n // 2] holds the smaller ones
        lower = max(lower, a[i])
    return (lower + upper) / 2


@numba.njit(cache=True)
def _robust(values: np.ndarray, scratch: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x MAD of ``values`` (``scratch``: a buffer at least as long).

    >>> v = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    >>> _robust(v, np.empty(6)) == (np.median(v), 1.4826 * np.median(np.abs(v - np.median(v))))
    True
    """
    n = len(values)
    scratch[:n] = values
    med = _median(scratch, n)
    for i in range(n):
        scratch[i] = abs(values[i] - med)
    return med, 1.4826 * _median(scratch, n)


@numba.njit(cache=True)
def _scan(sym, time, tid, price, logsize, quarantine_spikes, spike_k, window_ns, open_minute,
          ring_p, ring_v, ring_n, ref, ref_at, last, gap_sum, gap_sq, n_trades, hwm, pairs, unit,
          min_history, refresh, min_rel, min_log, horizon_ns, stale_k, stale_min_trades, seq_min_pairs,
          spike_z, outlier_z, late, too_late, missing, refill):
    """One pass over accepted trades in arrival order: robust deviations against each symbol's
    ring (refreshed every ``refresh`` trades), id gaps, lateness by the bar engine's rule
    (running open bar) and the normal-gap sums. Returns (open minute, newest trade time)."""
    n_ring = ring_p.shape[1]
    scratch = np.empty(n_ring)
    newest = 0
    for i in range(len(sym)):
        s = sym[i]
        n = ring_n[s]
        if n >= min_history and (ref_at[s] < 0 or n - ref_at[s] >= refresh):
            m = min(n, n_ring)
            ref[s, 0], ref[s, 1] = _robust(ring_p[s, :m], scratch)
            ref[s, 2], ref[s, 3] = _robust(ring_v[s, :m], scratch)
            ref_at[s] = n
        if ref_at[s] >= 0:
            spike_z[i] = abs(price[i] - ref[s, 0]) / max(ref[s, 1], min_rel * abs(ref[s, 0]))
            outlier_z[i] = (logsize[i] - ref[s, 2]) / max(ref[s, 3], min_log)
        ring_p[s, n % n_ring] = price[i]
        ring_v[s, n % n_ring] = logsize[i]
        ring_n[s] = n + 1
        if tid[i] >= 0:
            if tid[i] > hwm[s]:
                if hwm[s] >= 0:
                    d = tid[i] - hwm[s]
                    sequential = pairs[s] >= seq_min_pairs and 2 * unit[s] > pairs[s]
                    pairs[s] += 1
                    if d == 1:
                        unit[s] += 1
                    elif sequential:
                        missing[i] = d - 1
                hwm[s] = tid[i]
            else:
                refill[i] = True
        if quarantine_spikes and spike_z[i] > spike_k:
            continue  # not going to the bars
        t = time[i]
        minute = t - t % 60_000_000_000
        if open_minute < 0:
            open_minute = minute
        if minute < open_minute - window_ns:
            too_late[i] = True
            continue
        late[i] = minute < open_minute
        open_minute = max(open_minute, minute)
        newest = max(newest, t)
        if t > last[s]:
            if last[s] > 0:
                g = float(t - last[s])
                decay = np.exp(-g / horizon_ns)
                if n_trades[s] >= stale_min_trades and gap_sum[s] > 0:
                    g = min(g, stale_k * gap_sq[s] / gap_sum[s])  # an outage is not a normal gap
                gap_sum[s] = gap_sum[s] * decay + g
                gap_sq[s] = gap_sq[s] * decay + g * g
            last[s] = t
        n_trades[s] += 1
    return open_minute, newest


#: One kind of event of a batch: (counter, event times, symbols, weights or None for 1 each).
_Part = tuple[int, np.ndarray, np.ndarray, "np.ndarray | None"]


def _events(received: TradeBatch, accepted: TradeBatch, quarantine: Quarantine, late: np.ndarray,
            too_late: np.ndarray, spike: np.ndarray, outlier: np.ndarray, missing: np.ndarray,
            unparsed: Quarantine | None) -> list[_Part]:
    """A batch's counts as events, one part per counter (tallied by :func:`_tally`)."""
    a = accepted
    parts = [(_RECEIVED, received.time, received.symbol, None),
             (_ACCEPTED, a.time, a.symbol, None),
             (_REJECTED, quarantine.time, quarantine.symbol, None),
             (_LATE, a.time[late], a.symbol[late], None),
             (_TOO_LATE, a.time[too_late], a.symbol[too_late], None),
             (_SPIKE, a.time[spike], a.symbol[spike], None),
             (_OUTLIER, a.time[outlier], a.symbol[outlier], None),
             (_MISSING, a.time, a.symbol, missing),
             (_WITH_ID, a.time, a.symbol, (a.trade_id >= 0).astype(np.int64))]
    if unparsed is not None and len(unparsed):
        parts += [(_RECEIVED, unparsed.time, unparsed.symbol, None),
                  (_REJECTED, unparsed.time, unparsed.symbol, None)]
    return [part for part in parts if len(part[1])]


@numba.njit(cache=True, inline="always")
def _charged(t, lo, open_minute):
    """The minute an event at ``t`` is charged to: its own inside ``[lo, open_minute]``, else
    the open minute."""
    m = t - t % 60_000_000_000
    return m if lo <= m <= open_minute else open_minute


@numba.njit(cache=True)
def _mark(times, lo, open_minute, used):
    """Mark the minutes (slots of ``lo + k`` minutes) that events at ``times`` are charged to."""
    for i in range(len(times)):
        used[(_charged(times[i], lo, open_minute) - lo) // 60_000_000_000] = True


@numba.njit(cache=True)
def _tally(times, syms, weights, counter, lo, open_minute, slot, cells, feed):
    """Add events to ``cells[counter, minute, symbol]`` and ``feed[counter, minute]``; a
    negative symbol counts for the feed only; empty ``weights`` means 1 each."""
    weighted = len(weights) == len(times) and len(times) > 0
    for i in range(len(times)):
        j = slot[(_charged(times[i], lo, open_minute) - lo) // 60_000_000_000]
        w = weights[i] if weighted else 1
        feed[counter, j] += w
        if syms[i] >= 0:
            cells[counter, j, syms[i]] += w


@numba.njit(cache=True)
def _newest(times, syms, lo, open_minute, slot, last):
    """``last[minute, symbol]``: the newest of ``times`` per cell of its charged minute."""
    for i in range(len(times)):
        j = slot[(_charged(times[i], lo, open_minute) - lo) // 60_000_000_000]
        if times[i] > last[j, syms[i]]:
            last[j, syms[i]] = times[i]


_NO_WEIGHTS = np.zeros(0, np.int64)


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
        if len(self.times) and len(buckets) == 1 and buckets[0] == self.times[-1]:
            return np.array([len(self.times) - 1])
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
        self.grids = {tf: _Grid(tf) for tf in TIMEFRAMES if tf in timeframes or tf == "1m"}
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
        self.ref = np.zeros((s, 4))  # median and scale of prices and of log sizes
        self.ref_at = np.full(s, -1, np.int64)  # ring_n when ref was computed, -1 never
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
        # Per-minute counts not yet added to the higher timeframes: minute -> [cells, feeds, last].
        self._unrolled: dict[int, list] = {}

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
        self.ref_at = _grow_cols(self.ref_at, n, -1)
        self.ref = _grow_cols(self.ref.T, n, 0.0).T.copy()

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
        n = len(accepted)
        spike_z, outlier_z = np.full(n, np.nan), np.full(n, np.nan)
        late, too_late, refill = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        missing = np.zeros(n, np.int64)
        open_before = self.open_minute
        if n:
            self.symbol_feed[accepted.symbol] = f
            with np.errstate(divide="ignore"):
                logsize = np.log(accepted.size)
            om, newest = _scan(
                accepted.symbol, accepted.time, accepted.trade_id, accepted.price, logsize,
                c.quarantine_spikes, c.spike_k, (c.window - 1) * MINUTE,
                -1 if open_before is None else open_before, self.ring_price, self.ring_logsize,
                self.ring_n, self.ref, self.ref_at, self.last_time, self.gap_sum, self.gap_sq_sum,
                self.n_trades, self.id_hwm, self.id_pairs, self.id_unit, c.min_history,
                max(1, c.ring // 2), c.spike_min_rel, c.volume_min_log, c.stale_horizon_s * NS,
                c.stale_k, c.stale_min_trades, c.seq_min_pairs, spike_z, outlier_z, late, too_late, missing, refill)
            self.open_minute = None if om < 0 else int(om)
            self.newest = max(self.newest, int(newest))
        with np.errstate(invalid="ignore"):
            spike, outlier = spike_z > c.spike_k, outlier_z > c.volume_k
        gapped = np.flatnonzero(missing)
        flags = QualityFlags()
        if len(gapped) or spike.any() or outlier.any():
            flags = QualityFlags.concat([
                QualityFlags.of(accepted, np.flatnonzero(spike), "spike", spike_z[spike]),
                QualityFlags.of(accepted, np.flatnonzero(outlier), "volume_outlier", outlier_z[outlier]),
                QualityFlags.of(accepted, gapped, "id_gap", missing[gapped])])
        quarantine_mask = spike if c.quarantine_spikes else None
        events = _events(received, accepted, quarantine, late, too_late, spike, outlier, missing, unparsed)
        if self.open_minute is None:  # nothing accepted yet: charge to the first open bar
            self._pending.append((events, f))
            return QualityReport(flags, quarantine_mask)
        for pending, pf in self._pending:
            self._charge(pending, pf, self.open_minute, self.open_minute)
        self._pending = []
        lo = (open_before if open_before is not None else self.open_minute) - (c.window - 1) * MINUTE
        in_bars = ~too_late if quarantine_mask is None else ~too_late & ~spike
        self._charge(events, f, lo, self.open_minute, accepted.time[in_bars], accepted.symbol[in_bars])
        for i in gapped:  # gaps are rare where ids are sequential
            t = int(accepted.trade_id[i])
            self.gaps.setdefault(int(accepted.symbol[i]), []).append(
                [t - int(missing[i]), t - 1, int(accepted.time[i])])
        if self.gaps and refill.any():
            for i in np.flatnonzero(refill & np.isin(accepted.symbol, list(self.gaps))):
                self._refill(int(accepted.symbol[i]), int(accepted.trade_id[i]))
        self._expire_gaps(lo)
        return QualityReport(flags, quarantine_mask)

    def _charge(self, events: list[_Part], f: int, lo: int, open_minute: int,
                kept_t: np.ndarray | None = None, kept_s: np.ndarray | None = None) -> None:
        """Add events to the counters of the bar of the minute each is charged to (its own
        inside ``[lo, open_minute]``, else the open minute), and note the newest trade per cell
        of the trades kept in bars.

        Only the 1m counters change here; higher timeframes get the per-minute sums when read
        (:meth:`_roll_up`), which keeps a batch's cost independent of the timeframe count.
        """
        S = len(self.ring_n)
        used = np.zeros((open_minute - lo) // MINUTE + 1, bool)
        for _, times, _, _ in events:
            _mark(times, lo, open_minute, used)
        if kept_t is not None:
            _mark(kept_t, lo, open_minute, used)
        if not used.any():
            return
        slot = np.cumsum(used) - 1
        minutes = lo + MINUTE * np.flatnonzero(used).astype(np.int64)
        U = len(minutes)
        cells = np.zeros((_N_COUNTERS, U, S), np.int64)
        feed = np.zeros((_N_COUNTERS, U), np.int64)
        for counter, times, syms, weights in events:
            _tally(times, syms, _NO_WEIGHTS if weights is None else weights, counter, lo,
                   open_minute, slot, cells, feed)
        last = np.zeros((U, S), np.int64)
        if kept_t is not None and len(kept_t):
            _newest(kept_t, kept_s, lo, open_minute, slot, last)
        grid = self.grids["1m"]
        grid.widen(S, len(self.feeds))
        rows = grid.rows_for(minutes)
        for j in range(U):
            r = rows[j]
            grid.counts[:, r, :S] += cells[:, j]
            grid.feed_counts[:, r, f] += feed[:, j]
            np.maximum(grid.last[r, :S], last[j], out=grid.last[r, :S])
            if len(self.grids) > 1:
                acc = self._unrolled.get(int(minutes[j]))
                if acc is None:
                    self._unrolled[int(minutes[j])] = [cells[:, j].copy(), {f: feed[:, j].copy()}, last[j].copy()]
                    continue
                if acc[0].shape[1] < S:
                    acc[0], acc[2] = _grow_cols(acc[0], S, 0), _grow_cols(acc[2], S, 0)
                acc[0][:, :S] += cells[:, j]
                acc[1][f] = acc[1][f] + feed[:, j] if f in acc[1] else feed[:, j].copy()
                np.maximum(acc[2][:S], last[j], out=acc[2][:S])
        grid.touch(int(minutes.min()))
        if len(self._unrolled) > 240:
            self._roll_up()

    def _roll_up(self) -> None:
        """Add the per-minute sums not yet added to the higher timeframes."""
        if not self._unrolled:
            return
        unrolled, self._unrolled = self._unrolled, {}
        minutes = np.array(sorted(unrolled), dtype=np.int64)
        for tf, grid in self.grids.items():
            if tf == "1m":
                continue
            grid.widen(len(self.ring_n), len(self.feeds))
            buckets = minutes - minutes % grid.tf_ns
            rows = grid.rows_for(buckets)
            for m, r in zip(minutes.tolist(), rows):
                cells, feeds, last = unrolled[m]
                S = cells.shape[1]
                grid.counts[:, r, :S] += cells
                for f, v in feeds.items():
                    grid.feed_counts[:, r, f] += v
                np.maximum(grid.last[r, :S], last, out=grid.last[r, :S])
            grid.touch(int(buckets[0]))

    def normal_gap(self) -> np.ndarray:
        """Each symbol's normal gap between trades: the decayed sum of squared gaps over the
        sum of gaps (ns; NaN before ``stale_min_trades``)."""
        armed = (self.n_trades >= self.config.stale_min_trades) & (self.gap_sum > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(armed, self.gap_sq_sum / self.gap_sum, np.nan)

    def _refill(self, sym: int, trade_id: int) -> None:
        """An id inside a counted gap arrived (late): take its count back from the gap's bar."""
        self._roll_up()
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
        self._roll_up()
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
        self._roll_up()
        grid = self.grids[tf]
        n = len(symbols)
        # A reader may name symbols no batch has shown yet (the table is shared with the
        # flow): widen the per-symbol state with the grid so both keep one width.
        self._symbols(n)
        grid.widen(n, len(self.feeds))
        r0 = self._first(grid, since)
        values = self._components(grid.counts[:, r0:, :n], grid.stale[r0:, :n], grid.broken[r0:, :n])
        data = {k: (("time", "symbol"), v, QUALITY_ATTRS[k]) for k, v in values.items()}
        coords = {"time": ("time", grid.times[r0:].view("datetime64[ns]")),
                  "symbol": ("symbol", np.asarray(list(symbols), dtype=object))}
        return xr.Dataset(data, coords=coords)

    def feed_dataset(self, tf: str, since: int | None = None) -> xr.Dataset:
        """Scores of ``tf`` per (time, feed): the same components over each feed's symbols."""
        self._roll_up()
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
        self._roll_up()
        grid = self.grids[tf]
        out, grid.changed_from = grid.changed_from, None
        return out


__all__ = ["COMPONENTS", "FLAG_REASONS", "TOLERANCES", "WEIGHTS", "QualityConfig", "QualityEngine",
           "QualityFlags", "QualityReport"]
