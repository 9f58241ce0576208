"""Technical indicators per symbol and timeframe, updated incrementally and vectorized across symbols.

Every indicator is computed over each symbol's own non-empty bars (``trades > 0``), as a charting
user expects; where a symbol has no bar in a row its values are NaN. Each series equals TA-Lib
(default settings, unstable period 0) applied to that symbol's sequence of non-empty bars and
placed back at those rows. Warm-up -- the 0-based index, in the symbol's own bars, of the first
non-NaN value, with the default periods:

===========================  ========================================  =================
variable                     TA-Lib call                               first value at
===========================  ========================================  =================
``sma_20/50/200``            ``SMA(close, N)``                         N - 1
``ema_12/26/50``             ``EMA(close, N)`` (seeded by the SMA)     N - 1
``rsi_14``                   ``RSI(close, 14)`` (Wilder)               14
``macd/_signal/_hist``       ``MACD(close, 12, 26, 9)``                26 + 9 - 2 = 33
``bb_upper/middle/lower``    ``BBANDS(close, 20, 2, 2, matype=0)``     19
``stoch_k/stoch_d``          ``STOCH(h, l, c, 14, 3, 0, 3, 0)``        14 + 3 + 3 - 3 = 17
``atr_14``                   ``ATR(h, l, c, 14)``                      14
``adx_14``                   ``ADX(h, l, c, 14)``                      2 * 14 - 1 = 27
``volume_sma_20``            ``SMA(volume, 20)``                       19
``vwap_session``             sum(vwap * volume) / sum(volume) in the   0
                             session, over the symbol's bars
===========================  ========================================  =================

TA-Lib's MACD seeds its fast EMA late, with the SMA of the ``fast`` closes ending at index
``slow - 1``, so that both EMAs start together; ``macd`` therefore differs from
``ema_12 - ema_26`` and we follow TA-Lib. Sessions are UTC days unless
:attr:`IndicatorConfig.session_tz` / ``session_start`` say otherwise.

Incremental model (see :class:`IndicatorEngine`): recursive state per symbol (running sums,
EMAs, Wilder averages, session sums) is snapshotted after every closed row for the last
``max_rewind`` rows, keyed by bar time; the inputs of the window indicators live in per-symbol
rings indexed by the symbol's bar count. Replaying from a snapshot repeats exactly the
floating-point operations of a batch run, so incremental results equal batch results bit for bit.
"""
from __future__ import annotations

import datetime as _dt
import zoneinfo
from dataclasses import dataclass

import numba
import numpy as np

DAY = 86_400 * 1_000_000_000
_RINGS = ("close", "high", "low", "volume", "fastk", "slowk")
_C, _H, _L, _V, _FK, _SK = range(6)


@dataclass(frozen=True)
class IndicatorConfig:
    """Indicator periods and the session anchor.

    Parameters
    ----------
    sma, ema : periods of the close SMAs / EMAs (variables ``sma_{N}``, ``ema_{N}``).
    rsi, atr, adx, volume_sma : periods (variables ``rsi_{N}``, ``atr_{N}``, ``adx_{N}``,
        ``volume_sma_{N}``).
    macd : ``(fast, slow, signal)``; variables ``macd``, ``macd_signal``, ``macd_hist``.
    bbands : ``(period, k)``, bands at ``k`` standard deviations; ``bb_upper/middle/lower``.
    stoch : ``(fastk, slowk, slowd)``, both smoothings simple; ``stoch_k``, ``stoch_d``.
    session_tz : time zone whose local day is the VWAP session; None means UTC.
    session_start : nanoseconds after local midnight at which a session begins.
    max_rewind : closed rows whose state is kept so a late amendment can replay from them.

    Examples
    --------
    >>> IndicatorConfig(sma=(10,)).names[:3]
    ('sma_10', 'ema_12', 'ema_26')
    """

    sma: tuple[int, ...] = (20, 50, 200)
    ema: tuple[int, ...] = (12, 26, 50)
    rsi: int = 14
    macd: tuple[int, int, int] = (12, 26, 9)
    bbands: tuple[int, float] = (20, 2.0)
    stoch: tuple[int, int, int] = (14, 3, 3)
    atr: int = 14
    adx: int = 14
    volume_sma: int = 20
    session_tz: str | None = None
    session_start: int = 0
    max_rewind: int = 240

    def __post_init__(self) -> None:
        periods = [*self.sma, *self.ema, self.rsi, *self.macd, self.bbands[0], *self.stoch,
                   self.atr, self.adx, self.volume_sma]
        if any(int(p) != p or p < 2 for p in periods):
            raise ValueError("every indicator period must be an integer of at least 2")
        if self.macd[0] >= self.macd[1]:
            raise ValueError("macd fast period must be shorter than the slow one")
        if not 0 <= self.session_start < DAY:
            raise ValueError("session_start must be within one day (ns)")
        if self.max_rewind < 1:
            raise ValueError("max_rewind must be at least 1")
        if self.session_tz is not None:
            zoneinfo.ZoneInfo(self.session_tz)  # raises on an unknown zone

    @property
    def names(self) -> tuple[str, ...]:
        """Output variable names, in the order of the store contract."""
        return (*(f"sma_{p}" for p in self.sma), *(f"ema_{p}" for p in self.ema), f"rsi_{self.rsi}",
                "macd", "macd_signal", "macd_hist", "bb_upper", "bb_middle", "bb_lower",
                "stoch_k", "stoch_d", f"atr_{self.atr}", f"adx_{self.adx}",
                f"volume_sma_{self.volume_sma}", "vwap_session")

    def _layout(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Return the kernel's integer/float parameters, the state width and the ring length."""
        ns, ne = len(self.sma), len(self.ema)
        ip = np.array([ns, ne, self.rsi, *self.macd, self.bbands[0], *self.stoch, self.atr,
                       self.adx, self.volume_sma, *self.sma, *self.ema], dtype=np.int64)
        fp = np.array([float(self.bbands[1])], dtype=np.float64)
        width = 1 + ns + ne + len(_TAIL)
        longest = max(*self.sma, self.bbands[0], self.volume_sma, *self.stoch, 2)
        ring = 1 << int(np.ceil(np.log2(longest + self.max_rewind + 1)))
        return ip, fp, width, ring


# ---------------------------------------------------------------------------------------------
# numba kernel. State per symbol (float64): [n, sma totals..., emas..., then _TAIL fields].
# Outputs per row: [smas..., emas..., rsi, macd, signal, hist, bbu, bbm, bbl, k, d, atr, adx,
# vsma, vwap]. The arithmetic copies TA-Lib's C code operation by operation.

_TAIL = ("vol_tot", "bb_tot", "macd_fast", "macd_slow", "macd_signal", "rsi_gain", "rsi_loss",
         "atr", "adx_pdm", "adx_mdm", "adx_tr", "adx", "stoch_ktot", "stoch_dtot", "session",
         "session_pv", "session_v")


@numba.njit(inline="always")
def _is_zero(v):
    return -1e-8 < v < 1e-8


@numba.njit(inline="always")
def _true_range(h, l, pc):
    out = h - l
    t = abs(h - pc)
    out = max(out, t)
    t = abs(l - pc)
    out = max(out, t)
    return out


@numba.njit(inline="always")
def _window_sum(st, o, x, n, period, rings, kind, mask, out, k, r, s):
    """One TA-Lib SMA step: ``st[o]`` holds the sum of the last ``period - 1`` values."""
    if n < period - 1:
        st[o] += x
        out[r, k, s] = np.nan
        return np.nan
    t = st[o] + x
    st[o] = t - rings[kind, (n - period + 1) & mask, s]
    out[r, k, s] = t / period
    return t / period


@numba.njit(cache=True, error_model="numpy")
def _advance(snap, init, src, base, n_commit, rings, mask, high, low, close, volume, vwap, trades,
             session, out, row0, ip, fp, n_sym, seen, reuse):
    """Advance every symbol's state over ``len(close)`` rows, writing outputs and snapshots.

    Row ``j`` leaves its state in slot ``(base + j) % cap`` when ``j < n_commit`` (closed) and
    in the scratch slot ``cap`` otherwise (the forming bar, not committed to the rings).
    ``seen`` holds the inputs (and fast/slow %K) of the forming bar last computed, from the same
    committed state. ``reuse`` 1: the only row is that bar, still forming; symbols whose inputs
    equal ``seen`` are skipped. ``reuse`` 2: the first row is that bar, now closed and
    unchanged; it is committed from the scratch slot without recomputing.
    """
    cap = snap.shape[0] - 1
    m = close.shape[0]
    width = snap.shape[2]
    ns, ne, prsi, mf, msl, msg, pbb, kf, ks, kd, patr, padx, pvol = ip[0], ip[1], ip[2], ip[3], ip[4], ip[5], ip[6], ip[7], ip[8], ip[9], ip[10], ip[11], ip[12]
    oe = 1 + ns
    t0 = oe + ne
    ko = ns + ne  # first output after the averages
    nbdev = fp[0]
    for s in range(n_sym):
        prev = snap[src, s] if src >= 0 else init
        for j in range(m):
            dst = (base + j) % cap if j < n_commit else cap
            st = snap[dst, s]
            if reuse == 2 and j == 0:  # the forming bar closed unchanged: promote it
                scratch = snap[cap, s]
                for f in range(width):
                    st[f] = scratch[f]
                prev = st
                if trades[0, s] > 0:
                    cur = (np.int64(st[0]) - 1) & mask
                    rings[_C, cur, s] = close[0, s]
                    rings[_H, cur, s] = high[0, s]
                    rings[_L, cur, s] = low[0, s]
                    rings[_V, cur, s] = volume[0, s]
                    rings[_FK, cur, s] = seen[6, s]
                    rings[_SK, cur, s] = seen[7, s]
                continue
            if j >= n_commit:
                if (reuse == 1 and seen[0, s] == trades[j, s] and (trades[j, s] <= 0 or (
                        seen[1, s] == high[j, s] and seen[2, s] == low[j, s] and seen[3, s] == close[j, s]
                        and seen[4, s] == volume[j, s] and seen[5, s] == vwap[j, s]))):
                    continue  # forming bar unchanged since it was last computed
                seen[0, s] = trades[j, s]
                seen[1, s] = high[j, s]
                seen[2, s] = low[j, s]
                seen[3, s] = close[j, s]
                seen[4, s] = volume[j, s]
                seen[5, s] = vwap[j, s]
            for f in range(width):
                st[f] = prev[f]
            prev = st
            r = row0 + j
            if trades[j, s] <= 0:
                for k in range(out.shape[1]):
                    out[r, k, s] = np.nan
                continue
            commit = j < n_commit
            h, lo, c, v = high[j, s], low[j, s], close[j, s], volume[j, s]
            n = np.int64(st[0])
            cur, pk = n & mask, (n - 1) & mask
            pc, ph, pl = rings[_C, pk, s], rings[_H, pk, s], rings[_L, pk, s]
            for i in range(ns):
                _window_sum(st, 1 + i, c, n, ip[13 + i], rings, _C, mask, out, i, r, s)
            for i in range(ne):  # EMA seeded by the SMA of its first N values
                p, o = ip[13 + ns + i], oe + i
                if n < p - 1:
                    st[o] += c
                    out[r, ns + i, s] = np.nan
                else:
                    st[o] = (st[o] + c) / p if n == p - 1 else (c - st[o]) * (2.0 / (p + 1)) + st[o]
                    out[r, ns + i, s] = st[o]
            # RSI (Wilder)
            gain, loss = t0 + 5, t0 + 6
            rsi = np.nan
            if n > 0:
                d = c - pc
                if n > prsi:
                    st[loss] *= prsi - 1
                    st[gain] *= prsi - 1
                if d < 0:
                    st[loss] -= d
                else:
                    st[gain] += d
                if n >= prsi:
                    st[loss] /= prsi
                    st[gain] /= prsi
                    t = st[gain] + st[loss]
                    rsi = 0.0 if _is_zero(t) else 100.0 * (st[gain] / t)
            out[r, ko, s] = rsi
            # MACD: slow EMA from the start, fast EMA seeded at slow - 1, signal EMA of the line
            fa, sl, sg = t0 + 2, t0 + 3, t0 + 4
            line, sig = np.nan, np.nan
            if n >= msl - mf:
                st[fa] = st[fa] + c if n < msl - 1 else ((st[fa] + c) / mf if n == msl - 1 else (c - st[fa]) * (2.0 / (mf + 1)) + st[fa])
            st[sl] = st[sl] + c if n < msl - 1 else ((st[sl] + c) / msl if n == msl - 1 else (c - st[sl]) * (2.0 / (msl + 1)) + st[sl])
            if n >= msl - 1:
                q = n - (msl - 1)
                x = st[fa] - st[sl]
                if q < msg - 1:
                    st[sg] += x
                else:
                    st[sg] = (st[sg] + x) / msg if q == msg - 1 else (x - st[sg]) * (2.0 / (msg + 1)) + st[sg]
                    line, sig = x, st[sg]
            out[r, ko + 1, s] = line
            out[r, ko + 2, s] = sig
            out[r, ko + 3, s] = line - sig
            # Bollinger bands: population deviation around the SMA, two-pass over the ring
            # (TA-Lib 0.8 agrees to ~1e-12; a running sum of squares would drift)
            mid = _window_sum(st, t0 + 1, c, n, pbb, rings, _C, mask, out, ko + 5, r, s)
            if n < pbb - 1:
                out[r, ko + 4, s] = np.nan
                out[r, ko + 6, s] = np.nan
            else:
                var = 0.0
                for q in range(n - pbb + 1, n):
                    d = rings[_C, q & mask, s] - mid
                    var += d * d
                var = (var + (c - mid) * (c - mid)) / pbb
                dev = np.sqrt(var) * nbdev
                out[r, ko + 4, s] = mid + dev
                out[r, ko + 6, s] = mid - dev
            # Stochastic: fast %K over the ring, then two simple smoothings
            fk, sk, sdv = np.nan, np.nan, np.nan
            if n >= kf - 1:
                hh, ll = h, lo
                for q in range(n - kf + 1, n):
                    hh = max(hh, rings[_H, q & mask, s])
                    ll = min(ll, rings[_L, q & mask, s])
                diff = (hh - ll) / 100.0
                fk = (c - ll) / diff if diff != 0.0 else 0.0
                q = n - (kf - 1)
                if q < ks - 1:
                    st[t0 + 12] += fk
                else:
                    t = st[t0 + 12] + fk
                    st[t0 + 12] = t - rings[_FK, (n - ks + 1) & mask, s]
                    sk = t / ks
                    q -= ks - 1
                    if q < kd - 1:
                        st[t0 + 13] += sk
                    else:
                        t = st[t0 + 13] + sk
                        st[t0 + 13] = t - rings[_SK, (n - kd + 1) & mask, s]
                        sdv = t / kd
            out[r, ko + 7, s] = np.nan if np.isnan(sdv) else sk
            out[r, ko + 8, s] = sdv
            # ATR (Wilder) of the true range
            atr = np.nan
            if n > 0:
                tr = _true_range(h, lo, pc)
                if n < patr:
                    st[t0 + 7] += tr
                else:
                    st[t0 + 7] = (st[t0 + 7] + tr) / patr if n == patr else (st[t0 + 7] * (patr - 1) + tr) / patr
                    atr = st[t0 + 7]
            out[r, ko + 9, s] = atr
            # ADX: Wilder-smoothed DM and TR, DX summed over the second period, then smoothed
            adx = np.nan
            if n > 0:
                dp, dm = h - ph, pl - lo
                pdm, mdm, atr_, ax = t0 + 8, t0 + 9, t0 + 10, t0 + 11
                if n >= padx:
                    st[mdm] -= st[mdm] / padx
                    st[pdm] -= st[pdm] / padx
                if dm > 0 and dp < dm:
                    st[mdm] += dm
                elif dp > 0 and dp > dm:
                    st[pdm] += dp
                tr = _true_range(h, lo, pc)
                st[atr_] = st[atr_] + tr if n < padx else st[atr_] - st[atr_] / padx + tr
                if n >= padx:
                    dx = np.nan
                    if not _is_zero(st[atr_]):
                        mdi = 100.0 * (st[mdm] / st[atr_])
                        pdi = 100.0 * (st[pdm] / st[atr_])
                        t = mdi + pdi
                        if not _is_zero(t):
                            dx = 100.0 * (abs(mdi - pdi) / t)
                    if n < 2 * padx:
                        if not np.isnan(dx):
                            st[ax] += dx
                        if n == 2 * padx - 1:
                            st[ax] = st[ax] / padx
                            adx = st[ax]
                    else:
                        if not np.isnan(dx):
                            st[ax] = (st[ax] * (padx - 1) + dx) / padx
                        adx = st[ax]
            out[r, ko + 10, s] = adx
            _window_sum(st, t0, v, n, pvol, rings, _V, mask, out, ko + 11, r, s)
            # Session VWAP
            if st[t0 + 14] != session[j]:
                st[t0 + 14] = session[j]
                st[t0 + 15] = 0.0
                st[t0 + 16] = 0.0
            st[t0 + 15] += vwap[j, s] * v
            st[t0 + 16] += v
            out[r, ko + 12, s] = st[t0 + 15] / st[t0 + 16]
            st[0] = n + 1
            if not commit:
                seen[6, s] = fk
                seen[7, s] = sk
            else:
                rings[_C, cur, s] = c
                rings[_H, cur, s] = h
                rings[_L, cur, s] = lo
                rings[_V, cur, s] = v
                rings[_FK, cur, s] = fk
                rings[_SK, cur, s] = sk


# ---------------------------------------------------------------------------------------------


class IndicatorEngine:
    """Keep the indicator set of one timeframe up to date as its bars change.

    Feed it the bar engine's in-memory rows after each change. Closed rows are committed:
    their state is snapshotted (keyed by bar time) so a later amendment up to
    ``config.max_rewind`` closed rows back is replayed exactly. The forming row -- the last
    one, when ``forming`` is true -- is computed from the state after the last closed row
    without committing it, and flagged ``provisional``.

    Parameters
    ----------
    config : periods and the session anchor; defaults match the store contract.

    Examples
    --------
    >>> import numpy as np
    >>> times = np.arange(30, dtype=np.int64) * 60_000_000_000
    >>> close = 100.0 + np.arange(30.0).reshape(30, 1) % 7
    >>> fields = {"open": close, "high": close + 1, "low": close - 1, "close": close,
    ...           "volume": np.full((30, 1), 10.0), "vwap": close,
    ...           "trades": np.ones((30, 1), dtype=np.int64)}
    >>> engine = IndicatorEngine(IndicatorConfig(sma=(5,)))
    >>> engine.update(times, fields, start=0, forming=True)
    >>> out = engine.outputs()
    >>> out["sma_5"][:6, 0].round(2).tolist()
    [nan, nan, nan, nan, 102.0, 103.0]
    >>> out["provisional"][-2:].tolist()
    [False, True]
    """

    def __init__(self, config: IndicatorConfig | None = None):
        self.config = config or IndicatorConfig()
        self.names = self.config.names
        self._ip, self._fp, self._width, self._ring_len = self.config._layout()
        self._init = np.zeros(self._width)
        self._init[1 + len(self.config.sma) + len(self.config.ema) + _TAIL.index("session")] = -np.inf
        self._cap = self.config.max_rewind
        self._tz = None if self.config.session_tz is None else zoneinfo.ZoneInfo(self.config.session_tz)
        #: first row whose outputs changed in the last :meth:`update`.
        self.changed_from = 0
        self._alloc(rows=16, n_sym=1)

    # -- buffers ------------------------------------------------------------------------------

    def _alloc(self, rows: int, n_sym: int) -> None:
        n_sym = _padded(n_sym)
        self._n_sym = 0
        self._snap = np.empty((self._cap + 1, n_sym, self._width))
        self._snap[:] = self._init
        self._snap_times = np.zeros(self._cap, dtype=np.int64)
        self._head = self._count = 0
        self._evicted = False
        self._rings = np.zeros((len(_RINGS), self._ring_len, n_sym))
        self._out = np.full((rows, len(self.names), n_sym), np.nan)
        self._times = np.zeros(rows, dtype=np.int64)
        self._r0 = self._rows = 0
        self._forming = False
        # Inputs of the last computed forming bar, and (bar time, state generation, buffer row)
        # telling whether that computation can be reused.
        self._seen = np.full((8, n_sym), -1.0)
        self._seen_key: tuple | None = None
        self._gen = 0

    def _grow_symbols(self, n_sym: int) -> None:
        old = self._snap.shape[1]
        new = _padded(max(n_sym, 2 * old))
        snap = np.empty((self._cap + 1, new, self._width))
        snap[:] = self._init
        snap[:, :old] = self._snap
        rings = np.zeros((len(_RINGS), self._ring_len, new))
        rings[:, :, :old] = self._rings
        out = np.full((self._out.shape[0], self._out.shape[1], new), np.nan)
        out[:, :, :old] = self._out
        seen = np.full((8, new), -1.0)
        seen[:, :old] = self._seen
        self._snap, self._rings, self._out, self._seen = snap, rings, out, seen

    def _make_room(self, keep: int, rows: int) -> None:
        """Ensure rows ``r0 .. r0 + rows`` fit, keeping the first ``keep`` of the current rows."""
        if self._r0 + rows <= len(self._out):
            return
        cap = len(self._out) if rows <= len(self._out) // 2 else 2 * rows
        out = self._out if cap == len(self._out) else np.full((cap,) + self._out.shape[1:], np.nan)
        times = self._times if cap == len(self._times) else np.zeros(cap, dtype=np.int64)
        r0 = self._r0
        self._seen_key = None  # the forming row's outputs are not carried over
        out[:keep] = self._out[r0 : r0 + keep]
        times[:keep] = self._times[r0 : r0 + keep]
        self._out, self._times, self._r0 = out, times, 0

    def _sessions(self, times: np.ndarray) -> np.ndarray:
        """Session number of each bar time (days since the epoch in the session's calendar)."""
        if self._tz is None:
            local = times
        elif len(times) <= 8:
            local = times + np.array([_utcoffset_ns(int(t), self._tz) for t in times], dtype=np.int64)
        else:
            import pandas as pd

            idx = pd.DatetimeIndex(times.view("datetime64[ns]"), tz="UTC").tz_convert(self._tz)
            local = idx.tz_localize(None).asi8
        return ((local - self.config.session_start) // DAY).astype(np.float64)

    # -- the update ---------------------------------------------------------------------------

    def update(self, times: np.ndarray, fields: dict[str, np.ndarray], start: int,
               forming: bool = True) -> None:
        """Bring the outputs in line with the bar engine's current rows.

        Parameters
        ----------
        times : int64 ns bar open times, sorted (R,): the bar engine's in-memory rows.
        fields : ``open high low close volume vwap`` float64 and ``trades`` int64, each (R, S).
            Symbols may be appended as new columns between calls, never removed.
        start : first row whose inputs may have changed since the last call. Rows before it are
            the same bars as before, except rows dropped from the front.
        forming : the last row is the still-forming bar: computed, flagged provisional, not
            committed.

        Raises
        ------
        ValueError
            When ``start`` reaches back beyond the ``max_rewind`` closed rows kept, or the rows
            before ``start`` are not the rows seen before.
        """
        times = np.asarray(times).view(np.int64)
        close = fields["close"]
        n_rows, n_sym = close.shape
        if n_sym < self._n_sym:
            raise ValueError(f"symbols cannot be removed ({self._n_sym} -> {n_sym})")
        # Align with the rows seen last time: drop the ones trimmed from the front.
        r0, mine = self._r0, self._rows
        if mine and n_rows and self._times[r0] != times[0]:
            drop = int(np.searchsorted(self._times[r0 : r0 + mine], times[0]))
            self._r0, self._rows = r0 + drop, mine - drop
            r0, mine = self._r0, self._rows
        committed = mine - 1 if self._forming and mine else mine
        begin = max(0, min(int(start), committed, n_rows))
        if begin and self._times[r0 + begin - 1] != times[begin - 1]:
            raise ValueError(f"row {begin - 1} is not the bar seen before; pass an earlier start")
        src = self._rewind(times, begin)
        if n_sym > self._snap.shape[1]:
            self._grow_symbols(n_sym)
        self._n_sym = n_sym
        self._make_room(begin, n_rows)
        m = n_rows - begin
        n_commit = m - 1 if forming and m else m
        reuse = 0
        if self._seen_key == (int(times[begin]) if m else None, self._gen, self._r0 + begin):
            reuse = 1 if m == 1 and forming else (2 if start > begin and n_commit else 0)
        self._seen_key = None
        if m:
            rows = slice(begin, n_rows)
            _advance(self._snap, self._init, src, self._head + self._count, n_commit, self._rings,
                     self._ring_len - 1, fields["high"][rows], fields["low"][rows], close[rows],
                     fields["volume"][rows], fields["vwap"][rows], fields["trades"][rows],
                     self._sessions(times[rows]), self._out, self._r0 + begin, self._ip, self._fp,
                     n_sym, self._seen, reuse)
            self._times[self._r0 + begin : self._r0 + n_rows] = times[rows]
            self._commit(times[begin : begin + n_commit])
            if n_commit < m:
                self._seen_key = (int(times[-1]), self._gen, self._r0 + n_rows - 1)
        self._rows = n_rows
        self._forming = bool(forming and n_rows)
        self.changed_from = begin

    def _rewind(self, times: np.ndarray, begin: int) -> int:
        """Drop the snapshots of rows from ``begin`` on; return the slot to resume from (-1: none)."""
        cap, head, count = self._cap, self._head, self._count
        if begin < len(times):
            limit = times[begin]
            if count and self._snap_times[(head + count - 1) % cap] >= limit:
                logical = self._snap_times[(head + np.arange(count)) % cap]
                count = int(np.searchsorted(logical, limit))
        if count != self._count:
            self._count = count
            self._gen += 1
        if begin and (not count or self._snap_times[(head + count - 1) % cap] != times[begin - 1]):
            raise ValueError(f"cannot replay from row {begin}: it is more than max_rewind="
                             f"{self.config.max_rewind} closed rows back")
        if not count:
            if self._evicted:
                raise ValueError("cannot replay from the first row: its state was evicted")
            return -1
        return (head + count - 1) % cap

    def _commit(self, times: np.ndarray) -> None:
        n, cap = len(times), self._cap
        if n == 1:
            self._snap_times[(self._head + self._count) % cap] = times[0]
        elif n:
            self._snap_times[(self._head + self._count + np.arange(n)) % cap] = times
        self._count += n
        self._gen += n > 0
        if self._count > cap:
            self._head = (self._head + self._count - cap) % cap
            self._count = cap
            self._evicted = True

    # -- reading ------------------------------------------------------------------------------

    def outputs(self) -> dict[str, np.ndarray]:
        """Return each indicator as a (R, S) float64 view aligned with the last ``times``.

        The views are valid until the next :meth:`update`; copy what you keep. ``provisional``
        (R,) bool marks the forming row.
        """
        rows = slice(self._r0, self._r0 + self._rows)
        out = {name: self._out[rows, k, : self._n_sym] for k, name in enumerate(self.names)}
        provisional = np.zeros(self._rows, dtype=bool)
        if self._forming:
            provisional[-1] = True
        out["provisional"] = provisional
        return out

    # -- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Return everything needed to resume exactly (copies)."""
        slots = (self._head + np.arange(self._count)) % self._cap
        rows = slice(self._r0, self._r0 + self._rows)
        return {
            "layout": np.concatenate([self._ip, self._fp.view(np.int64), [self._cap, self._ring_len,
                                      self.config.session_start]]),
            "times": self._times[rows].copy(),
            "outputs": self._out[rows, :, : self._n_sym].copy(),
            "forming": np.array([self._forming]),
            "evicted": np.array([self._evicted]),
            "snap_times": self._snap_times[slots],
            "snap": self._snap[slots, : self._n_sym].copy(),
            "rings": self._rings[:, :, : self._n_sym].copy(),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from :meth:`state` taken by an engine with the same configuration."""
        if not np.array_equal(state["layout"], self.state()["layout"]):
            raise ValueError("state was taken with a different IndicatorConfig")
        n_rows, n_sym = state["outputs"].shape[0], state["outputs"].shape[2]
        self._alloc(rows=max(2 * n_rows, 16), n_sym=max(n_sym, 1))
        self._n_sym, self._rows = n_sym, n_rows
        self._out[:n_rows, :, :n_sym] = state["outputs"]
        self._times[:n_rows] = state["times"]
        self._forming = bool(state["forming"][0])
        self._evicted = bool(state["evicted"][0])
        self._count = len(state["snap_times"])
        self._snap_times[: self._count] = state["snap_times"]
        self._snap[: self._count, :n_sym] = state["snap"]
        self._rings[:, :, :n_sym] = state["rings"]

    def pending_from(self, times: np.ndarray) -> int:
        """Return the first row of ``times`` not yet committed (the ``start`` to pass after a restore)."""
        if not self._count:
            return 0
        last = self._snap_times[(self._head + self._count - 1) % self._cap]
        return int(np.searchsorted(np.asarray(times).view(np.int64), last, side="right"))


def _padded(n_sym: int) -> int:
    """Symbol capacity: a multiple of 8 doubles spanning an odd number of cache lines, so the
    rows of the (position, symbol) rings do not alias to the same cache sets."""
    lines = -(-n_sym // 8)
    return 8 * (lines + 1 - lines % 2)


def _utcoffset_ns(t: int, tz: zoneinfo.ZoneInfo) -> int:
    when = _dt.datetime.fromtimestamp(t // 1_000_000_000, tz)
    return int(when.utcoffset().total_seconds()) * 1_000_000_000
