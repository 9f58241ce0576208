"""Event-time OHLCV bars: the 1m core, higher timeframes, late trades and the rolling window.

Bar semantics (named once, in :class:`BarConfig`):

* a bar covers ``[t, t + tf)`` and is labelled by its open time ``t`` (UTC); 1m-4h align to
  multiples of the timeframe since the epoch, 1d to UTC midnight;
* within a bar trades are ordered by event time, then trade id, then arrival: ``open`` is the
  first trade in that order and ``close`` the last, whatever order they arrived in;
* the *open bar* is the 1m bar of the newest event time seen; the rolling window is the
  ``window`` minutes ending with it. A late trade inside the window amends its bar (and the
  bars of every higher timeframe that contain it); an older one is refused as ``too_late``.

Each batch is folded in one pass (numba) into per-(minute, symbol) partial bars, which are
then merged into every timeframe. Partial bars carry the order keys of their first and last
trade, so merging is order-independent: the same trades cut into any batches give the same
bars. Trade counts, OHLC and order are exact; volume and vwap sums are float64 and may differ
from another summation order in the last bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import pandas as pd
import xarray as xr

from flows.schema import (BAR_ATTRS, BAR_FIELDS, REASONS, TIMEFRAMES, BarBatch, Quarantine,
                          SymbolTable, TradeBatch)

MINUTE = TIMEFRAMES["1m"]
_NONE = np.iinfo(np.int64).max  # "no dirty row" marker

# State of a bar per (row, symbol): prices, sums, and the order keys of its first/last trade.
_FLOAT_FIELDS = ("open", "high", "low", "close", "volume", "pv")
_INT_FIELDS = ("trades", "first_time", "first_id", "first_seq", "last_time", "last_id", "last_seq")
STATE_FIELDS = _FLOAT_FIELDS + _INT_FIELDS


@dataclass(frozen=True)
class BarConfig:
    """How trades become bars.

    Parameters
    ----------
    timeframes : the timeframes to build; 1m is always built (the others roll up from it).
    window : minutes of 1m bars, ending with the open bar, that late trades may still amend.
        Older trades are quarantined as ``too_late``.
    history : bars per timeframe kept in memory (the rolling datasets); must exceed ``window``.
    """

    timeframes: tuple[str, ...] = tuple(TIMEFRAMES)
    window: int = 120
    history: int = 500
    label: str = field(default="left", init=False)  # bars are labelled by their open time
    closed: str = field(default="left", init=False)  # [t, t + tf)

    def __post_init__(self) -> None:
        unknown = [tf for tf in self.timeframes if tf not in TIMEFRAMES]
        if unknown:
            raise ValueError(f"unknown timeframe {unknown[0]!r}")
        if "1m" not in self.timeframes:
            object.__setattr__(self, "timeframes", ("1m",) + tuple(self.timeframes))
        if self.window < 1:
            raise ValueError("window must be at least 1 minute")
        if self.history <= self.window:
            raise ValueError(f"history ({self.history}) must exceed window ({self.window})")


# ---------------------------------------------------------------------------------------------
# numba kernels


@numba.njit(cache=True, inline="always")
def _before(t1, i1, s1, t2, i2, s2):
    """True when order key (t1, i1, s1) sorts before (t2, i2, s2)."""
    if t1 != t2:
        return t1 < t2
    if i1 != i2:
        return i1 < i2
    return s1 < s2


@numba.njit(cache=True)
def _fold_trades(local, sym, time, tid, seq, price, size, count, f, k):
    """Fold trades into partial bars ``f[field, local, sym]`` (floats) / ``k[...]`` (ints)."""
    for i in range(len(local)):
        j = local[i]
        s = sym[i]
        p = price[i]
        if k[0, j, s] == 0:
            f[0, j, s] = p
            f[1, j, s] = p
            f[2, j, s] = p
            f[3, j, s] = p
            k[1, j, s] = time[i]
            k[2, j, s] = tid[i]
            k[3, j, s] = seq[i]
            k[4, j, s] = time[i]
            k[5, j, s] = tid[i]
            k[6, j, s] = seq[i]
        else:
            if _before(time[i], tid[i], seq[i], k[1, j, s], k[2, j, s], k[3, j, s]):
                f[0, j, s] = p
                k[1, j, s] = time[i]
                k[2, j, s] = tid[i]
                k[3, j, s] = seq[i]
            if _before(k[4, j, s], k[5, j, s], k[6, j, s], time[i], tid[i], seq[i]):
                f[3, j, s] = p
                k[4, j, s] = time[i]
                k[5, j, s] = tid[i]
                k[6, j, s] = seq[i]
            if p > f[1, j, s]:
                f[1, j, s] = p
            if p < f[2, j, s]:
                f[2, j, s] = p
        f[4, j, s] += size[i]
        f[5, j, s] += p * size[i]
        k[0, j, s] += count[i]


@numba.njit(cache=True)
def _fold_bars(local, sym, t_open, t_close, seq, o, h, lo, c, v, pv, count, f, k):
    """Fold ready-made bars into partial bars: each bar is a first trade at its open time
    (price ``o``) and a last one at its close time (price ``c``)."""
    for i in range(len(local)):
        j = local[i]
        s = sym[i]
        if k[0, j, s] == 0:
            f[0, j, s] = o[i]
            f[1, j, s] = h[i]
            f[2, j, s] = lo[i]
            f[3, j, s] = c[i]
            k[1, j, s] = t_open[i]
            k[2, j, s] = -1
            k[3, j, s] = seq[i]
            k[4, j, s] = t_close[i]
            k[5, j, s] = -1
            k[6, j, s] = seq[i]
        else:
            if _before(t_open[i], -1, seq[i], k[1, j, s], k[2, j, s], k[3, j, s]):
                f[0, j, s] = o[i]
                k[1, j, s] = t_open[i]
                k[2, j, s] = -1
                k[3, j, s] = seq[i]
            if _before(k[4, j, s], k[5, j, s], k[6, j, s], t_close[i], -1, seq[i]):
                f[3, j, s] = c[i]
                k[4, j, s] = t_close[i]
                k[5, j, s] = -1
                k[6, j, s] = seq[i]
            if h[i] > f[1, j, s]:
                f[1, j, s] = h[i]
            if lo[i] < f[2, j, s]:
                f[2, j, s] = lo[i]
        f[4, j, s] += v[i]
        f[5, j, s] += pv[i]
        k[0, j, s] += count[i]


@numba.njit(cache=True)
def _merge(rowmap, pf, pk, f, k):
    """Merge partial bars ``pf/pk[:, j, :]`` into rows ``rowmap[j]`` of ``f/k``."""
    n_local, n_sym = pk.shape[1], pk.shape[2]
    for j in range(n_local):
        r = rowmap[j]
        if r < 0:
            continue
        for s in range(n_sym):
            if pk[0, j, s] == 0:
                continue
            if k[0, r, s] == 0:
                for x in range(6):
                    f[x, r, s] = pf[x, j, s]
                for x in range(7):
                    k[x, r, s] = pk[x, j, s]
                continue
            if _before(pk[1, j, s], pk[2, j, s], pk[3, j, s], k[1, r, s], k[2, r, s], k[3, r, s]):
                f[0, r, s] = pf[0, j, s]
                k[1, r, s] = pk[1, j, s]
                k[2, r, s] = pk[2, j, s]
                k[3, r, s] = pk[3, j, s]
            if _before(k[4, r, s], k[5, r, s], k[6, r, s], pk[4, j, s], pk[5, j, s], pk[6, j, s]):
                f[3, r, s] = pf[3, j, s]
                k[4, r, s] = pk[4, j, s]
                k[5, r, s] = pk[5, j, s]
                k[6, r, s] = pk[6, j, s]
            if pf[1, j, s] > f[1, r, s]:
                f[1, r, s] = pf[1, j, s]
            if pf[2, j, s] < f[2, r, s]:
                f[2, r, s] = pf[2, j, s]
            f[4, r, s] += pf[4, j, s]
            f[5, r, s] += pf[5, j, s]
            k[0, r, s] += pk[0, j, s]


def _empty_state(rows: int, n_sym: int) -> tuple[np.ndarray, np.ndarray]:
    f = np.zeros((len(_FLOAT_FIELDS), rows, n_sym), dtype=np.float64)
    f[:4] = np.nan
    k = np.zeros((len(_INT_FIELDS), rows, n_sym), dtype=np.int64)
    return f, k


# ---------------------------------------------------------------------------------------------


class BarFrame:
    """The bars of one timeframe: sorted bar times and the state arrays of each (time, symbol).

    Rows exist only for bar times in which at least one symbol traded.
    """

    def __init__(self, tf: str, n_sym: int, capacity: int):
        self.tf = tf
        self.tf_ns = TIMEFRAMES[tf]
        self.times = np.empty(capacity, dtype=np.int64)
        self.n = 0
        self.f, self.k = _empty_state(capacity, n_sym)
        #: earliest bar time changed since the last :meth:`take_changes` (``_NONE`` if none).
        self.dirty_from = _NONE

    @property
    def n_sym(self) -> int:
        return self.f.shape[2]

    def _reserve(self, rows: int, n_sym: int) -> None:
        cap, old_sym = self.f.shape[1], self.f.shape[2]
        if rows <= cap and n_sym <= old_sym:
            return
        new_cap = max(cap, rows if rows <= cap else max(rows, 2 * cap))
        # Symbols grow by a quarter, in steps of 64: doubling 498 columns for two late, quiet
        # symbols would double the memory of every timeframe.
        new_sym = old_sym if n_sym <= old_sym else -(-max(n_sym, old_sym + old_sym // 4) // 64) * 64
        f, k = _empty_state(new_cap, new_sym)
        f[:, : self.n, :old_sym] = self.f[:, : self.n]
        k[:, : self.n, :old_sym] = self.k[:, : self.n]
        times = np.empty(new_cap, dtype=np.int64)
        times[: self.n] = self.times[: self.n]
        self.f, self.k, self.times = f, k, times

    def rows_for(self, buckets: np.ndarray, n_sym: int) -> np.ndarray:
        """Return the row of each bucket time, inserting empty rows for new ones."""
        if self.n and buckets[0] == buckets[-1] == self.times[self.n - 1] and n_sym <= self.n_sym:
            self.dirty_from = min(self.dirty_from, int(buckets[0]))
            return np.full(len(buckets), self.n - 1, dtype=np.int64)  # the open bar: most batches
        times = self.times[: self.n]
        ub = np.unique(buckets)
        pos = np.searchsorted(times, ub)
        present = (pos < self.n) & (times[np.minimum(pos, max(self.n - 1, 0))] == ub) if self.n else np.zeros(len(ub), bool)
        new = ub[~present]
        self._reserve(self.n + len(new), n_sym)
        if len(new):
            if self.n == 0 or new[0] > self.times[self.n - 1]:
                self.times[self.n : self.n + len(new)] = new
                self.n += len(new)
            else:  # a late trade opened a bar between existing rows: shift the rows after it
                merged = np.union1d(self.times[: self.n], new)
                old_rows = np.searchsorted(merged, self.times[: self.n])
                f, k = _empty_state(self.f.shape[1], self.f.shape[2])
                f[:, old_rows] = self.f[:, : self.n]
                k[:, old_rows] = self.k[:, : self.n]
                self.f, self.k = f, k
                self.n = len(merged)
                self.times[: self.n] = merged
        self.dirty_from = min(self.dirty_from, int(ub[0]))
        return np.searchsorted(self.times[: self.n], buckets)

    def trim(self, keep: int, amendable_from: int) -> None:
        """Drop the oldest rows beyond ``keep``, never an amendable or not yet taken one."""
        limit = min(amendable_from, self.dirty_from)
        drop = min(self.n - keep, int(np.searchsorted(self.times[: self.n], limit)))
        if drop <= 0 or drop < keep // 4 and self.n < self.f.shape[1]:
            return  # shift rarely: only when a quarter of the rows can go, or when full
        self.f[:, : self.n - drop] = self.f[:, drop : self.n]
        self.k[:, : self.n - drop] = self.k[:, drop : self.n]
        self.times[: self.n - drop] = self.times[drop : self.n]
        self.f[:4, self.n - drop : self.n] = np.nan
        self.f[4:, self.n - drop : self.n] = 0
        self.k[:, self.n - drop : self.n] = 0
        self.n -= drop

    def fields(self, rows: slice = slice(None), symbols: slice | int = slice(None)) -> dict[str, np.ndarray]:
        """Return the contract's bar fields for the given rows (copies)."""
        f = self.f[:, : self.n][:, rows, symbols]
        k = self.k[:, : self.n][:, rows, symbols]
        volume = f[4].copy()
        with np.errstate(invalid="ignore", divide="ignore"):
            vwap = np.where(k[0] > 0, f[5] / np.where(volume == 0, np.nan, volume), np.nan)
        return {"open": f[0].copy(), "high": f[1].copy(), "low": f[2].copy(), "close": f[3].copy(),
                "volume": volume, "trades": k[0].copy(), "vwap": vwap}


@dataclass
class BarUpdate:
    """What one batch did: trades refused as too late, and per timeframe the earliest bar touched."""

    too_late: Quarantine
    touched_from: dict[str, int]
    accepted: int


class BarEngine:
    """Fold trade batches into event-time OHLCV bars for several timeframes.

    Parameters
    ----------
    symbols : the flow's symbol table (codes index the symbol axis).
    config : bar semantics and window sizes.

    Examples
    --------
    >>> from flows.schema import NS
    >>> table = SymbolTable()
    >>> engine = BarEngine(table, BarConfig(timeframes=("1m", "1h")))
    >>> batch = TradeBatch.from_columns(table, time=[70 * NS, 61 * NS, 130 * NS],
    ...     symbol=["X", "X", "X"], price=[10.0, 11.0, 12.0], size=[1.0, 3.0, 2.0])
    >>> _ = engine.update(batch)
    >>> ds = engine.dataset("1m")
    >>> ds["open"].values.ravel().tolist(), ds["close"].values.ravel().tolist()
    ([11.0, 12.0], [10.0, 12.0])
    >>> engine.dataset("1h").volume.values.ravel().tolist()
    [6.0]
    """

    def __init__(self, symbols: SymbolTable, config: BarConfig | None = None):
        self.symbols = symbols
        self.config = config or BarConfig()
        # Rows grow on demand (doubling): a day of 1d bars needs one row, not history * 1.5.
        cap = min(64, self.config.history + self.config.history // 2 + 8)
        self.frames = {tf: BarFrame(tf, max(len(symbols), 1), cap) for tf in self.config.timeframes}
        #: newest 1m bar time seen (the open bar); ``None`` before the first trade.
        self.open_minute: int | None = None
        #: arrival sequence number of the next accepted trade.
        self.seq = 0
        #: bumped on every change; views compare it to skip work.
        self.version = 0

    @property
    def amendable_from(self) -> int | None:
        """Oldest 1m bar time a late trade may still amend."""
        if self.open_minute is None:
            return None
        return self.open_minute - (self.config.window - 1) * MINUTE

    def _split_late(self, minute: np.ndarray) -> np.ndarray:
        """Return the mask of items older than the window, advancing the open bar.

        The open bar as each item arrived is the running maximum, so the verdict on an item
        does not depend on how the items were cut into batches.
        """
        n = len(minute)
        running = np.maximum.accumulate(minute)
        before = np.empty(n, dtype=np.int64)
        before[0] = self.open_minute if self.open_minute is not None else minute[0]
        if n > 1:
            np.maximum(running[:-1], before[0], out=before[1:])
        self.open_minute = max(int(running[-1]), int(before[0]))
        return minute < before - (self.config.window - 1) * MINUTE

    def _local_grid(self, minute: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map items to batch-local bar slots: (slot per item, slot times, slot used)."""
        lo, hi = int(minute.min()), int(minute.max())
        span = (hi - lo) // step + 1
        if span * max(len(self.symbols), 1) <= 4_000_000:
            local = ((minute - lo) // step).astype(np.int64)
            times = lo + np.arange(span, dtype=np.int64) * step
            return local, times, np.bincount(local, minlength=span) > 0
        times, local = np.unique(minute, return_inverse=True)
        return local.astype(np.int64), times, np.ones(len(times), dtype=bool)

    def _merge_partials(self, times: np.ndarray, used: np.ndarray, pf: np.ndarray, pk: np.ndarray,
                        min_tf_ns: int = MINUTE) -> dict[str, int]:
        touched = {}
        n_sym = pf.shape[2]
        for tf, frame in self.frames.items():
            if frame.tf_ns < min_tf_ns:
                continue
            buckets = times - times % frame.tf_ns
            rowmap = np.full(len(times), -1, dtype=np.int64)
            rowmap[used] = frame.rows_for(buckets[used], n_sym)
            _merge(rowmap, pf, pk, frame.f, frame.k)
            touched[tf] = int(buckets[used][0])
            amendable = self.amendable_from - self.amendable_from % frame.tf_ns
            frame.trim(self.config.history, amendable)
        self.version += 1
        return touched

    def update(self, batch: TradeBatch) -> BarUpdate:
        """Fold a batch of valid, de-duplicated trades into the bars.

        Returns the trades refused as ``too_late`` and the earliest bar each timeframe touched.
        """
        if len(batch) == 0:
            return BarUpdate(Quarantine(), {}, 0)
        minute = batch.time - batch.time % MINUTE
        late = self._split_late(minute)
        too_late = Quarantine()
        if late.any():
            too_late = Quarantine.from_batch(batch.take(late), np.full(int(late.sum()), REASONS.index("too_late")))
            batch, minute = batch.take(~late), minute[~late]
            if len(batch) == 0:
                return BarUpdate(too_late, {}, 0)
        n = len(batch)
        seq = np.arange(self.seq, self.seq + n, dtype=np.int64)
        self.seq += n
        local, times, used = self._local_grid(minute, MINUTE)
        pf, pk = _empty_state(len(times), len(self.symbols))
        _fold_trades(local, batch.symbol, batch.time, batch.trade_id, seq, batch.price, batch.size,
                     batch.count, pf, pk)
        return BarUpdate(too_late, self._merge_partials(times, used, pf, pk), n)

    def update_bars(self, tf: str, bars: BarBatch) -> BarUpdate:
        """Fold ready-made bars of timeframe ``tf`` into ``tf`` and every higher timeframe.

        Each bar counts as its trades (one where the count is unknown), opens at its open time
        and closes at the end of its interval; late bars follow the same window rule as trades.
        """
        if len(bars) == 0:
            return BarUpdate(Quarantine(), {}, 0)
        tf_ns = TIMEFRAMES[tf]
        start = bars.time - bars.time % tf_ns
        late = self._split_late(start)
        too_late = Quarantine()
        if late.any():
            too_late = Quarantine.from_bars(bars.take(late), np.full(int(late.sum()), REASONS.index("too_late")))
            bars, start = bars.take(~late), start[~late]
            if len(bars) == 0:
                return BarUpdate(too_late, {}, 0)
        n = len(bars)
        seq = np.arange(self.seq, self.seq + n, dtype=np.int64)
        self.seq += n
        local, times, used = self._local_grid(start, tf_ns)
        pf, pk = _empty_state(len(times), len(self.symbols))
        pv = np.where(np.isfinite(bars.vwap), bars.vwap * bars.volume, np.nan)
        _fold_bars(local, bars.symbol, start, start + tf_ns - 1, seq, bars.open, bars.high, bars.low,
                   bars.close, bars.volume, pv, np.maximum(bars.trades, 1), pf, pk)
        return BarUpdate(too_late, self._merge_partials(times, used, pf, pk, tf_ns), n)

    # -- reading ------------------------------------------------------------------------------

    def dataset(self, tf: str, last: int | None = None) -> xr.Dataset:
        """Return the in-memory bars of ``tf`` (the rolling window) as an xarray Dataset."""
        frame = self.frames[tf]
        start = 0 if last is None else max(frame.n - last, 0)
        return self._to_dataset(frame, slice(start, frame.n))

    def _to_dataset(self, frame: BarFrame, rows: slice) -> xr.Dataset:
        n_sym = len(self.symbols)
        values = frame.fields(rows, slice(0, n_sym))
        if frame.n_sym < n_sym:  # symbols registered after the last trade batch
            pad = n_sym - frame.n_sym
            values = {k: np.pad(v, ((0, 0), (0, pad)), constant_values=0 if k in ("trades", "volume") else np.nan)
                      for k, v in values.items()}
        return make_bars_dataset(frame.times[: frame.n][rows], self.symbols.names, values)

    def symbol_frame(self, tf: str, code: int, last: int | None = None) -> pd.DataFrame:
        """Return one symbol's non-empty bars of ``tf`` as a DataFrame indexed by time."""
        frame = self.frames[tf]
        if code >= frame.n_sym:
            return empty_bars_frame()
        values = frame.fields(slice(None), code)
        traded = values["trades"] > 0
        times = frame.times[: frame.n][traded]
        df = pd.DataFrame({k: v[traded] for k, v in values.items()}, index=pd.DatetimeIndex(times.view("datetime64[ns]"), name="time"))
        return df if last is None else df.iloc[-last:]

    def forget_changes(self) -> None:
        """Mark every change as taken without building it (a flow without a store: rows
        already taken may then be trimmed beyond ``history``)."""
        for frame in self.frames.values():
            frame.dirty_from = _NONE

    def take_changes(self, tf: str) -> xr.Dataset | None:
        """Return the bars changed since the last call (from the earliest changed row to the end)."""
        frame = self.frames[tf]
        if frame.dirty_from == _NONE:
            return None
        start = int(np.searchsorted(frame.times[: frame.n], frame.dirty_from))
        frame.dirty_from = _NONE
        return self._to_dataset(frame, slice(start, frame.n))

    # -- checkpoints --------------------------------------------------------------------------

    def state(self, amendable_only: bool = False) -> dict[str, np.ndarray]:
        """Return everything needed to resume exactly (for store checkpoints).

        With ``amendable_only``, only the rows late trades can still change (older rows are
        final and in the store): a copy of a few rows instead of the whole window.
        """
        out: dict[str, np.ndarray] = {
            "open_minute": np.array([-1 if self.open_minute is None else self.open_minute]),
            "seq": np.array([self.seq]),
        }
        since = self.amendable_from if amendable_only else None
        for tf, frame in self.frames.items():
            first = 0
            if since is not None:
                first = int(np.searchsorted(frame.times[: frame.n], since - since % frame.tf_ns))
            n_sym = len(self.symbols)
            out[f"{tf}/times"] = frame.times[first : frame.n].copy()
            out[f"{tf}/f"] = frame.f[:, first : frame.n, :n_sym].copy()
            out[f"{tf}/k"] = frame.k[:, first : frame.n, :n_sym].copy()
        return out

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from :meth:`state`; every restored row is marked changed."""
        om = int(state["open_minute"][0])
        self.open_minute = None if om < 0 else om
        self.seq = int(state["seq"][0])
        for tf, frame in self.frames.items():
            if f"{tf}/times" not in state:
                continue
            times, f, k = state[f"{tf}/times"], state[f"{tf}/f"], state[f"{tf}/k"]
            frame.n = 0
            frame._reserve(len(times), max(f.shape[2], 1))
            frame.times[: len(times)] = times
            frame.f[:, : len(times), : f.shape[2]] = f
            frame.k[:, : len(times), : f.shape[2]] = k
            frame.n = len(times)
            frame.dirty_from = int(times[0]) if len(times) else _NONE
        self.version += 1

    def preload(self, tf: str, times: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Put stored bars older than the in-memory rows back in front of them (after a restart).

        They are final (older than the window), so they carry no order keys and are not marked
        changed; they only give the rolling datasets their history back.
        """
        frame = self.frames[tf]
        if frame.n:
            keep = times < frame.times[0]
            times, values = times[keep], {k: v[keep] for k, v in values.items()}
        first = max(len(times) - max(self.config.history - frame.n, 0), 0)
        times, values = times[first:], {k: v[first:] for k, v in values.items()}
        m, n_sym = len(times), values["close"].shape[1]
        if m == 0:
            return
        frame._reserve(frame.n + m, n_sym)
        frame.f[:, m : m + frame.n] = frame.f[:, : frame.n].copy()
        frame.k[:, m : m + frame.n] = frame.k[:, : frame.n].copy()
        frame.times[m : m + frame.n] = frame.times[: frame.n].copy()
        f, k = _empty_state(m, frame.f.shape[2])
        for i, name in enumerate(("open", "high", "low", "close", "volume")):
            f[i, :, :n_sym] = values[name]
        f[5, :, :n_sym] = np.where(values["trades"] > 0, values["vwap"] * values["volume"], 0.0)
        k[0, :, :n_sym] = values["trades"]
        frame.f[:, :m], frame.k[:, :m], frame.times[:m] = f, k, times
        frame.n += m
        self.version += 1


def make_bars_dataset(times: np.ndarray, symbols, values: dict[str, np.ndarray]) -> xr.Dataset:
    """Build a bars Dataset (dims time x symbol) in the store contract's layout."""
    coords = {"time": ("time", np.asarray(times, dtype=np.int64).view("datetime64[ns]")),
              "symbol": ("symbol", np.asarray(symbols, dtype=object).astype(str).astype(object))}
    data = {name: (("time", "symbol"), values[name].astype(dtype, copy=False), BAR_ATTRS[name])
            for name, dtype in BAR_FIELDS.items()}
    return xr.Dataset(data, coords=coords)


def empty_bars_frame() -> pd.DataFrame:
    """Return an empty bars DataFrame with the contract's columns and dtypes."""
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in BAR_FIELDS.items()},
                        index=pd.DatetimeIndex([], dtype="datetime64[ns]", name="time"))
