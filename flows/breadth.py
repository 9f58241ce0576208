"""Market breadth and sector performance over the whole universe, one timeframe at a time.

Definitions (each row is one bar time of the timeframe; a symbol *has a bar* in a row when its
``trades`` there are > 0):

* **session** -- the trading day a bar belongs to: ``floor((local_time - session_start) / 1 day)``
  with ``local_time`` the bar's open time in ``session_tz`` (UTC midnight to midnight by default).
  Use the same calendar as the bars, so that a 1d bar is its own session.
* **previous session close** (``ref``) -- for a symbol in a session, the close of its last bar in
  any earlier session (its own last close before the session began; a symbol that skipped a
  session is compared with the last session it traded in). On 1d bars this is the previous
  bar's close; intraday, every bar of a session is compared with the previous session's last close.
* **advancers / decliners / unchanged** -- symbols with a bar in the row whose close is above /
  below / equal to their previous session close. A symbol without a bar in the row, or without a
  previous session close (its first session in the history), is not counted at all. On daily
  data this counts the symbols that traded that day.
* **ad_line** -- cumulative sum of ``advancers - decliners`` from the first row of the history
  (it continues across updates, front trimming and restarts).
* **up_volume / down_volume** -- the row's volume of the advancing / declining symbols.
* **new_highs / new_lows** -- symbols whose bar high (low) is above (below) the highest high
  (lowest low) of their own previous ``high_low_bars`` non-empty bars. A symbol with fewer
  previous bars is not counted. ``high_low_bars=252`` on 1d bars gives 52-week highs and lows.
* **pct_above_sma_N** -- percent (0-100) of the symbols with a bar in the row whose close is
  above their SMA N in that row; symbols whose SMA is NaN there are left out of the denominator.
  NaN when no symbol qualifies (or no SMA was given). "Above" means by more than a relative
  ``1e-9``: a close equal to its SMA in exact arithmetic (a flat stretch, or a mean that lands
  on the tick) is not above it, whichever way the SMA's summation rounded its last bit.
* **mcclellan** -- ``EMA19 - EMA39`` of net advances (``advancers - decliners``), classic and
  unadjusted; ``EMA_n = EMA_n[-1] + a (net - EMA_n[-1])`` with ``a = 2 / (n + 1)``, each EMA
  seeded with the net advances of the first row that counts any symbol (pandas
  ``ewm(span=n, adjust=False)`` from that row). NaN before it.

Sectors (per row and sector; a symbol's return is ``close / ref - 1`` over the counted symbols):
``return`` (equal-weighted mean), ``return_vw`` (weighted by the row's dollar volume,
``close * volume``), ``advancers``, ``decliners``, ``unchanged``, and ``volume`` (the row's volume
of every member with a bar). Symbols without a sector go to ``"Unknown"``. The sector axis only
grows, in order of first appearance.

Every value of a row is a function of the rows up to it and of the state before the first
retained row, so the engine recomputes from the first changed row and nothing else.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd

from flows.schema import SymbolTable

DAY = 86_400_000_000_000
UNKNOWN_SECTOR = "Unknown"
_NO_SESSION = np.iinfo(np.int64).min
#: A close must exceed its SMA by this relative margin to count as above it (rounding noise).
ABOVE_RTOL = 1e-9

#: Variables of ``sectors/{tf}`` (dims time, sector), in store order, with dtypes.
SECTOR_FIELDS: dict[str, str] = {
    "return": "float64", "return_vw": "float64", "advancers": "int64", "decliners": "int64",
    "unchanged": "int64", "volume": "float64",
}
#: Per-(row, symbol) arrays kept for the window: bar inputs, then carried previous session close,
#: last close and its session.
_CELLS: dict[str, type] = {
    "close": np.float64, "high": np.float64, "low": np.float64, "volume": np.float64,
    "has": np.bool_, "ref": np.float64, "lastc": np.float64, "lasts": np.int64,
}
_FILL: dict[str, float | bool | int] = {
    "close": np.nan, "high": np.nan, "low": np.nan, "volume": 0.0,
    "has": False, "ref": np.nan, "lastc": np.nan, "lasts": _NO_SESSION,
}
_COUNTS = ("advancers", "decliners", "unchanged", "ad_line", "new_highs", "new_lows")


@dataclass(frozen=True)
class BreadthConfig:
    """What breadth counts.

    Parameters
    ----------
    high_low_bars : previous non-empty bars of a symbol that a new high/low must beat.
    sma_periods : SMA periods N reported as ``pct_above_sma_N`` (arrays come from the indicators).
    mcclellan_spans : the fast and slow EMA spans of the McClellan oscillator.
    session_tz : time zone of the session calendar; None means UTC.
    session_start : nanoseconds after local midnight at which a session begins.

    The session fields mean what they mean in :class:`flows.indicators.IndicatorConfig`: pass
    the same values to both.
    """

    high_low_bars: int = 20
    sma_periods: tuple[int, ...] = (50, 200)
    mcclellan_spans: tuple[int, int] = (19, 39)
    session_tz: str | None = None
    session_start: int = 0

    def __post_init__(self) -> None:
        if self.high_low_bars < 1:
            raise ValueError("high_low_bars must be at least 1")
        if not 0 < self.mcclellan_spans[0] < self.mcclellan_spans[1]:
            raise ValueError("mcclellan_spans must be (fast, slow) with 0 < fast < slow")
        if not 0 <= self.session_start < DAY:
            raise ValueError("session_start must be within one day (ns)")
        if self.session_tz is not None:
            pd.Timestamp(0, tz=self.session_tz)  # raises on an unknown time zone

    @property
    def breadth_fields(self) -> dict[str, str]:
        """Variables of ``breadth/{tf}`` (dim time), in store order, with dtypes."""
        out = dict.fromkeys(_COUNTS, "int64")
        out.update({f"pct_above_sma_{n}": "float64" for n in self.sma_periods})
        out.update(up_volume="float64", down_volume="float64", mcclellan="float64")
        return out

    def sessions(self, times: np.ndarray) -> np.ndarray:
        """Return the session number of each bar time (int64 ns, UTC)."""
        t = np.asarray(times, dtype=np.int64)
        if self.session_tz is not None and len(t):
            idx = pd.DatetimeIndex(t.view("datetime64[ns]")).tz_localize("UTC")
            t = idx.tz_convert(self.session_tz).tz_localize(None).as_unit("ns").asi8
        return (t - self.session_start) // DAY


# ---------------------------------------------------------------------------------------------
# numba kernels


@numba.njit(cache=True)
def _carry_closes(start, stop, sess, close, has, ref, lastc, lasts, ref0, lastc0, lasts0):
    """Fill rows ``start:stop`` of the per-cell previous session close, last close and session."""
    r_ref, r_last, r_sess = ref0.copy(), lastc0.copy(), lasts0.copy()
    for r in range(start, stop):
        q = sess[r]
        for s in range(close.shape[1]):
            if has[r, s]:
                if r_sess[s] != q:
                    r_ref[s] = r_last[s]
                    r_sess[s] = q
                r_last[s] = close[r, s]
            ref[r, s] = r_ref[s]
            lastc[r, s] = r_last[s]
            lasts[r, s] = r_sess[s]


@numba.njit(cache=True)
def _new_highs_lows(start, stop, has, high, low, n, base_hi, base_lo, base_cnt, nh, nl):
    """Count per row ``start:stop`` the symbols beating their previous ``n`` non-empty bars."""
    hbuf = np.empty(n + stop - start)
    lbuf = np.empty(n + stop - start)
    for s in range(has.shape[1]):
        k, r = 0, start - 1
        while r >= 0 and k < n:  # walk back to the n-th previous bar inside the window
            if has[r, s]:
                k += 1
            r -= 1
        p = 0
        for j in range(base_cnt[s] - min(n - k, base_cnt[s]), base_cnt[s]):  # then the state before it
            hbuf[p] = base_hi[s, j]
            lbuf[p] = base_lo[s, j]
            p += 1
        for rr in range(r + 1, stop):
            if not has[rr, s]:
                continue
            if rr >= start and p >= n:
                hmax, lmin = hbuf[p - n], lbuf[p - n]
                for j in range(p - n + 1, p):
                    hmax = max(hmax, hbuf[j])
                    lmin = min(lmin, lbuf[j])
                if high[rr, s] > hmax:
                    nh[rr - start] += 1
                if low[rr, s] < lmin:
                    nl[rr - start] += 1
            hbuf[p] = high[rr, s]
            lbuf[p] = low[rr, s]
            p += 1


@numba.njit(cache=True)
def _fold_highs_lows(stop, has, high, low, base_hi, base_lo, base_cnt):
    """Push the non-empty highs/lows of rows ``:stop`` into the per-symbol last-n buffers."""
    n = base_hi.shape[1]
    tmp_h = np.empty(n + stop)
    tmp_l = np.empty(n + stop)
    for s in range(has.shape[1]):
        p = 0
        for j in range(base_cnt[s]):
            tmp_h[p] = base_hi[s, j]
            tmp_l[p] = base_lo[s, j]
            p += 1
        for r in range(stop):
            if has[r, s]:
                tmp_h[p] = high[r, s]
                tmp_l[p] = low[r, s]
                p += 1
        keep = min(p, n)
        for j in range(keep):
            base_hi[s, j] = tmp_h[p - keep + j]
            base_lo[s, j] = tmp_l[p - keep + j]
        base_cnt[s] = keep


@numba.njit(cache=True)
def _sector_sums(close, ref, has, volume, codes, sums, counts):
    """Per row and sector: sums of return, return x dollar volume, dollar volume, volume; and
    counts of members with a return, advancers, decliners, unchanged."""
    for r in range(close.shape[0]):
        for s in range(close.shape[1]):
            if not has[r, s]:
                continue
            k = codes[s]
            sums[3, r, k] += volume[r, s]
            c, p = close[r, s], ref[r, s]
            if np.isnan(p):  # no previous session close
                continue
            x = c / p - 1.0
            dollars = c * volume[r, s]
            sums[0, r, k] += x
            sums[1, r, k] += x * dollars
            sums[2, r, k] += dollars
            counts[0, r, k] += 1
            if c > p:
                counts[1, r, k] += 1
            elif c < p:
                counts[2, r, k] += 1
            else:
                counts[3, r, k] += 1


@numba.njit(cache=True)
def _running(net, issues, ad0, fast0, slow0, a_fast, a_slow, ad, fast, slow):
    """A/D line and the two EMAs of net advances, continuing from ``ad0, fast0, slow0``."""
    a, f, w = ad0, fast0, slow0
    for i in range(len(net)):
        a += net[i]
        if not np.isnan(f):
            f = (1.0 - a_fast) * f + a_fast * net[i]
            w = (1.0 - a_slow) * w + a_slow * net[i]
        elif issues[i] > 0:
            f = w = float(net[i])
        ad[i], fast[i], slow[i] = a, f, w


# ---------------------------------------------------------------------------------------------


def _grow(arr: np.ndarray, rows: int, cols: int | None, fill) -> np.ndarray:
    """Return ``arr`` copied into a larger array filled with ``fill``."""
    out = np.full((rows,) if cols is None else (rows, cols), fill, dtype=arr.dtype)
    out[tuple(slice(0, d) for d in arr.shape)] = arr
    return out


class BreadthEngine:
    """Breadth and sector figures of one timeframe, updated incrementally from its bars.

    Parameters
    ----------
    config : what is counted (see the module docstring for the definitions).
    sectors : the sector of each symbol code; missing or empty ones are ``"Unknown"``.

    Examples
    --------
    Three symbols over two daily sessions; Z has no bar on the second day:

    >>> day = 86_400_000_000_000
    >>> close = np.array([[10.0, 20.0, 5.0], [11.0, 19.0, np.nan]])
    >>> bars = dict(open=close, high=close, low=close, close=close,
    ...             volume=np.array([[1.0, 2, 3], [4, 5, 0]]), trades=np.array([[1, 1, 1], [1, 1, 0]]))
    >>> engine = BreadthEngine(sectors=["Tech", "Energy", "Tech"])
    >>> engine.update(np.array([0, day]), bars, start=0)
    >>> b = engine.breadth()
    >>> b["advancers"].tolist(), b["decliners"].tolist(), b["up_volume"].tolist()
    ([0, 1], [0, 1], [0.0, 4.0])
    >>> names, sec = engine.sectors()
    >>> names, sec["return"][1].round(3).tolist()
    (['Tech', 'Energy'], [0.1, -0.05])
    """

    def __init__(self, config: BreadthConfig | None = None, sectors: Sequence[str | None] | None = None):
        self.config = config or BreadthConfig()
        c = self.config
        self._a_fast, self._a_slow = (2.0 / (n + 1.0) for n in c.mcclellan_spans)
        self.sector_names: list[str] = []
        self._sector_of = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._n_sym = 0
        self._times = np.zeros(0, dtype=np.int64)
        self._sess = np.zeros(0, dtype=np.int64)
        self._cells = {k: np.zeros((0, 0), dtype=d) for k, d in _CELLS.items()}
        self._rows = {k: np.zeros(0, dtype=d) for k, d in c.breadth_fields.items()}
        self._rows.update(ema_fast=np.zeros(0), ema_slow=np.zeros(0))
        self._sec = {k: np.zeros((0, 0), dtype=d) for k, d in SECTOR_FIELDS.items()}
        # State from rows already dropped from the front of the window.
        self._base = {"ref": np.zeros(0), "lastc": np.zeros(0), "lasts": np.zeros(0, np.int64),
                      "hi": np.zeros((0, c.high_low_bars)), "lo": np.zeros((0, c.high_low_bars)),
                      "cnt": np.zeros(0, np.int64), "scalars": np.array([0.0, np.nan, np.nan])}
        #: Earliest bar time (ns) whose figures changed since the last :meth:`take_changed`.
        self.changed_from: int | None = None
        self.set_sectors(list(sectors or []))

    # -- sectors ----------------------------------------------------------------------------

    def set_sectors(self, sectors: Sequence[str | None]) -> None:
        """Set the sector of each symbol code (the list may grow); recompute if any moved."""
        old = self._codes(self._n_sym)
        self._sector_of = np.array([self._sector_index(s or UNKNOWN_SECTOR) for s in sectors], dtype=np.int64)
        if self._n and not np.array_equal(old, self._codes(self._n_sym)):
            self._compute_sectors(0)
            self.changed_from = int(self._times[0])

    def _sector_index(self, name: str) -> int:
        if name not in self.sector_names:
            self.sector_names.append(name)
        return self.sector_names.index(name)

    def _codes(self, n_sym: int) -> np.ndarray:
        """Return the sector index of symbol codes ``0..n_sym-1`` (``Unknown`` past the list)."""
        known = min(n_sym, len(self._sector_of))
        if known == n_sym:
            return self._sector_of[:n_sym].copy()
        codes = np.full(n_sym, self._sector_index(UNKNOWN_SECTOR), dtype=np.int64)
        codes[:known] = self._sector_of[:known]
        return codes

    # -- updating ---------------------------------------------------------------------------

    def update(self, times: np.ndarray, fields: Mapping[str, np.ndarray], start: int,
               sma: Mapping[int, np.ndarray] | None = None, forming: bool = True) -> None:
        """Recompute the figures of rows ``start:`` from the timeframe's bars.

        Parameters
        ----------
        times : (R,) int64 ns bar times, sorted; the timeframe's whole in-memory window.
        fields : ``close high low volume`` (R, S) float64 and ``trades`` (R, S) int64.
        start : first row whose inputs may have changed. Earlier rows are the ones of the last
            call (matched by bar time; rows gone from the front are folded into the state).
        sma : SMA arrays (R, S) by period, from the indicators; missing periods give NaN.
        forming : whether the last row is still open. Accepted for symmetry with the indicator
            engine: a forming row is simply recomputed on the next call, so it changes nothing.
        """
        times = np.asarray(times, dtype=np.int64)
        R, S = len(times), int(np.shape(fields["close"])[1])
        old_times = self._times[: self._n]
        drop = np.searchsorted(old_times, times[0]).item() if R else self._n
        start = min(int(start), R, self._n - drop)
        same = old_times[drop: drop + start] == times[:start]
        if not same.all():
            start = int(np.argmin(same))
        if S > self._n_sym and start:
            late = np.flatnonzero((np.asarray(fields["trades"])[:start, self._n_sym:] > 0).any(axis=1))
            start = int(late[0]) if len(late) else start
        if drop:
            self._drop_front(drop)
        self._reserve(R, S)
        self._n, self._n_sym = R, S
        self._times[:R] = times
        self._sess[start:R] = self.config.sessions(times[start:])
        cells = self._cells
        has = np.asarray(fields["trades"])[start:] > 0
        cells["has"][start:R, :S] = has
        for k in ("close", "high", "low"):
            cells[k][start:R, :S] = np.where(has, fields[k][start:], np.nan)
        cells["volume"][start:R, :S] = np.where(has, fields["volume"][start:], 0.0)
        self._compute(start, sma or {})
        if R > start:
            t0 = int(times[start])
            self.changed_from = t0 if self.changed_from is None else min(self.changed_from, t0)

    def _reserve(self, rows: int, n_sym: int) -> None:
        cap, scap = self._cells["close"].shape
        if rows <= cap and n_sym <= scap:
            return
        rows = max(cap, rows if rows <= cap else max(rows, cap + cap // 2))
        n_sym = max(scap, n_sym if n_sym <= scap else max(n_sym, scap + scap // 4))
        self._cells = {k: _grow(v, rows, n_sym, _FILL[k]) for k, v in self._cells.items()}
        self._times, self._sess = _grow(self._times, rows, None, 0), _grow(self._sess, rows, None, 0)
        self._rows = {k: _grow(v, rows, None, 0) for k, v in self._rows.items()}
        self._sec = {k: _grow(v, rows, v.shape[1], 0) for k, v in self._sec.items()}
        b = self._base
        for k, fill in (("ref", np.nan), ("lastc", np.nan), ("lasts", _NO_SESSION), ("cnt", 0)):
            b[k] = _grow(b[k], n_sym, None, fill)
        b["hi"], b["lo"] = (_grow(b[k].T, b[k].shape[1], n_sym, np.nan).T.copy() for k in ("hi", "lo"))

    def _drop_front(self, drop: int) -> None:
        """Fold rows ``:drop`` into the state before the window and shift the rest up."""
        b, c, n, last = self._base, self._cells, self._n, drop - 1
        S = self._n_sym
        for k in ("ref", "lastc", "lasts"):
            b[k][:S] = c[k][last, :S]
        _fold_highs_lows(drop, c["has"][:drop, :S], c["high"][:drop, :S], c["low"][:drop, :S],
                         b["hi"], b["lo"], b["cnt"])
        b["scalars"] = np.array([self._rows["ad_line"][last], self._rows["ema_fast"][last],
                                 self._rows["ema_slow"][last]])
        for group in (self._cells, self._rows, self._sec):
            for v in group.values():
                v[: n - drop] = v[drop:n]
        self._times[: n - drop] = self._times[drop:n]
        self._sess[: n - drop] = self._sess[drop:n]
        self._n -= drop

    def _compute(self, start: int, sma: Mapping[int, np.ndarray]) -> None:
        c, rows, b = self._cells, self._rows, self._base
        R, S, m = self._n, self._n_sym, self._n - start
        view = {k: v[:R, :S] for k, v in c.items()}
        prev = (lambda k: view[k][start - 1]) if start else (lambda k: b[k][:S])
        _carry_closes(start, R, self._sess, view["close"], view["has"], view["ref"], view["lastc"],
                      view["lasts"], prev("ref"), prev("lastc"), prev("lasts"))
        close, ref, has, vol = (view[k][start:] for k in ("close", "ref", "has", "volume"))
        adv, dec, unch = close > ref, close < ref, close == ref
        rows["advancers"][start:R] = adv.sum(axis=1)
        rows["decliners"][start:R] = dec.sum(axis=1)
        rows["unchanged"][start:R] = unch.sum(axis=1)
        rows["up_volume"][start:R] = np.where(adv, vol, 0.0).sum(axis=1)
        rows["down_volume"][start:R] = np.where(dec, vol, 0.0).sum(axis=1)
        nh, nl = np.zeros(m, np.int64), np.zeros(m, np.int64)
        _new_highs_lows(start, R, view["has"], view["high"], view["low"], self.config.high_low_bars,
                        b["hi"][:S], b["lo"][:S], b["cnt"][:S], nh, nl)
        rows["new_highs"][start:R], rows["new_lows"][start:R] = nh, nl
        for n in self.config.sma_periods:
            rows[f"pct_above_sma_{n}"][start:R] = _pct_above(close, has, sma.get(n), start, S)
        net = rows["advancers"][start:R] - rows["decliners"][start:R]
        issues = rows["advancers"][start:R] + rows["decliners"][start:R] + rows["unchanged"][start:R]
        ad0, fast0, slow0 = ((rows["ad_line"][start - 1], rows["ema_fast"][start - 1], rows["ema_slow"][start - 1])
                             if start else b["scalars"])
        _running(net, issues, int(ad0), float(fast0), float(slow0), self._a_fast, self._a_slow,
                 rows["ad_line"][start:R], rows["ema_fast"][start:R], rows["ema_slow"][start:R])
        rows["mcclellan"][start:R] = rows["ema_fast"][start:R] - rows["ema_slow"][start:R]
        self._compute_sectors(start)

    def _compute_sectors(self, start: int) -> None:
        R, S = self._n, self._n_sym
        codes = self._codes(S)  # may add "Unknown"
        k = self._widen_sectors()
        sums = np.zeros((4, R - start, k))
        counts = np.zeros((4, R - start, k), dtype=np.int64)
        _sector_sums(*(self._cells[n][start:R, :S] for n in ("close", "ref", "has", "volume")), codes,
                     sums, counts)
        ret_sum, wret_sum, weight, volume = sums
        members, adv, dec, unch = counts
        sec = {n: v[start:R, :k] for n, v in self._sec.items()}
        with np.errstate(invalid="ignore", divide="ignore"):
            sec["return"][:] = np.where(members > 0, ret_sum / members, np.nan)
            sec["return_vw"][:] = np.where(weight > 0, wret_sum / weight, np.nan)
        sec["advancers"][:], sec["decliners"][:], sec["unchanged"][:] = adv, dec, unch
        sec["volume"][:] = volume

    def take_changed(self) -> int | None:
        """Return the earliest bar time whose figures changed since the last call, and reset it."""
        out, self.changed_from = self.changed_from, None
        return out

    # -- reading ----------------------------------------------------------------------------

    @property
    def times(self) -> np.ndarray:
        """Bar times (int64 ns) of the rows, as given to the last :meth:`update`."""
        return self._times[: self._n].copy()

    def breadth(self) -> dict[str, np.ndarray]:
        """Return the breadth variables, each (R,) aligned with the last ``times``."""
        return {k: self._rows[k][: self._n].copy() for k in self.config.breadth_fields}

    def _widen_sectors(self) -> int:
        """Give the sector variables a column per sector name (a sector named since the last
        update, e.g. by a read, has no members in the rows so far); return the count."""
        k = len(self.sector_names)
        if self._sec["return"].shape[1] < k:
            self._sec = {n: _grow(v, v.shape[0], k, np.nan if n.startswith("return") else 0)
                         for n, v in self._sec.items()}
        return k

    def sectors(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Return the sector names and the sector variables, each (R, n_sectors)."""
        k = self._widen_sectors()
        return list(self.sector_names), {n: v[: self._n, :k].copy() for n, v in self._sec.items()}

    # -- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Return everything needed to resume exactly (plain numpy arrays, ``np.savez``-able)."""
        n, S = self._n, self._n_sym
        out = {"times": self._times[:n].copy(), "sess": self._sess[:n].copy(),
               "sector_of": self._sector_of.copy(), "sector_names": np.array(self.sector_names, dtype=str),
               "config": self._config_key()}
        out.update({f"cells/{k}": v[:n, :S].copy() for k, v in self._cells.items()})
        out.update({f"rows/{k}": v[:n].copy() for k, v in self._rows.items()})
        out.update({f"sec/{k}": v[:n, : len(self.sector_names)].copy() for k, v in self._sec.items()})
        out.update({f"base/{k}": (v if k == "scalars" else v[:S]).copy() for k, v in self._base.items()})
        return out

    def _config_key(self) -> np.ndarray:
        c = self.config
        return np.array([c.high_low_bars, *c.mcclellan_spans, *c.sma_periods], dtype=np.int64)

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Resume from :meth:`state` (taken with the same config)."""
        if np.asarray(state["config"]).tolist() != self._config_key().tolist():
            raise ValueError("breadth state was taken with another config")
        self.sector_names = [str(s) for s in state["sector_names"]]
        self._sector_of = np.asarray(state["sector_of"], dtype=np.int64).copy()
        n, S = state["cells/close"].shape
        self._n = self._n_sym = 0
        self._times, self._sess = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._cells = {k: np.zeros((0, 0), dtype=d) for k, d in _CELLS.items()}
        self._rows = {k: np.zeros(0, dtype=v.dtype) for k, v in self._rows.items()}
        self._sec = {k: np.zeros((0, len(self.sector_names)), dtype=d) for k, d in SECTOR_FIELDS.items()}
        self._base = {k: np.asarray(state[f"base/{k}"]).copy() for k in self._base}
        self._reserve(n, S)
        self._n, self._n_sym = n, S
        self._times[:n], self._sess[:n] = state["times"], state["sess"]
        for k, v in self._cells.items():
            v[:n, :S] = state[f"cells/{k}"]
        for k, v in self._rows.items():
            v[:n] = state[f"rows/{k}"]
        for k, v in self._sec.items():
            v[:n] = state[f"sec/{k}"]
        self.changed_from = int(self._times[0]) if n else None


def _pct_above(close: np.ndarray, has: np.ndarray, sma: np.ndarray | None, start: int, S: int) -> np.ndarray:
    """Percent of symbols with a bar and a finite SMA whose close is above it, per row."""
    if sma is None:
        return np.full(len(close), np.nan)
    sma = np.asarray(sma, dtype=np.float64)[start:, :S]
    if sma.shape[1] < S:
        sma = np.pad(sma, ((0, 0), (0, S - sma.shape[1])), constant_values=np.nan)
    valid = has & ~np.isnan(sma)
    n = valid.sum(axis=1)
    above = (valid & (close > sma + ABOVE_RTOL * np.abs(sma))).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * above / n, np.nan)


def heatmap_table(engine: BreadthEngine, symbols: Sequence[str], names: Sequence[str] | None = None,
                  row: int = -1) -> pd.DataFrame:
    """Return one row's symbol returns by sector, ready for a heatmap/treemap.

    Each symbol that traded in the row's session up to and including the row gives its return
    from the previous session close to its latest close and its volume in the session so far
    (summed over the retained rows of that session). On 1d bars that is the day's bar. The
    return is NaN for a symbol in its first session (no previous session close). Columns ``symbol, sector, name, return, volume``, sorted by sector then symbol.
    """
    n, S = engine._n, engine._n_sym
    if n == 0:
        return pd.DataFrame({"symbol": [], "sector": [], "name": [], "return": [], "volume": []})
    r = row % n
    c = engine._cells
    q = engine._sess[r]
    traded = np.flatnonzero(c["lasts"][r, :S] == q)
    first = int(np.searchsorted(engine._sess[:n], q))
    volume = c["volume"][first: r + 1, traded].sum(axis=0)
    sector = np.array(engine.sector_names, dtype=object)[engine._codes(S)[traded]]
    sym = np.array([*symbols, *map(str, range(len(symbols), S))], dtype=object)
    out = pd.DataFrame({
        "symbol": sym[traded],
        "sector": sector,
        "name": ["" if names is None or i >= len(names) else names[i] for i in traded],
        "return": c["lastc"][r, traded] / c["ref"][r, traded] - 1.0,
        "volume": volume,
    })
    return out.sort_values(["sector", "symbol"], kind="stable").reset_index(drop=True)


def sectors_of(symbols: SymbolTable) -> list[str]:
    """Return the sector of each code of ``symbols`` from its metadata (``"Unknown"`` if none)."""
    return [symbols.meta.get(s, {}).get("sector") or UNKNOWN_SECTOR for s in symbols.names]


def read_symbols_file(path: str) -> dict[str, dict[str, str]]:
    """Read symbol metadata from a CSV with ``Symbol``/``ticker`` and optional ``Name``, ``Sector``,
    ``Exchange`` columns (any case) into ``{symbol: {"name", "sector", "exchange"}}``."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    cols = {k.lower(): k for k in rows[0]}
    key = cols.get("symbol") or cols.get("ticker")
    if key is None:
        raise ValueError(f"{path}: no Symbol or ticker column")
    return {r[key]: {f: r[cols[f]] for f in ("name", "sector", "exchange") if f in cols} for r in rows}
