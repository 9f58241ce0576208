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
Closed rows are computed symbol by symbol; the forming row, recomputed after every batch, by a
kernel vectorized across symbols that gathers its inputs from the committed state once per closed
bar and repeats the same operations, so a bar gets the same bits whether forming or closed.
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
# numba kernels. State per symbol (float64): [n, sma totals..., emas..., then _TAIL fields].
# Outputs per row: [smas..., emas..., rsi, macd, signal, hist, bbu, bbm, bbl, k, d, atr, adx,
# vsma, vwap]. The arithmetic copies TA-Lib's C code operation by operation. The kernels
# allocate nothing, so they run without numba's reference counting (``_nrt=False``): with it,
# the views of each symbol's state cost atomic increments that took half the time of a step.

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


@numba.njit(inline="always")
def _periods(ip, fp):
    """The fixed periods and ``nbdev``, read once per kernel call rather than once per step."""
    return (ip[0], ip[1], ip[2], ip[3], ip[4], ip[5], ip[6], ip[7], ip[8], ip[9], ip[10], ip[11],
            ip[12], fp[0])


@numba.njit(inline="always")
def _step(prev, st, s, j, commit, rings, mask, high, low, close, volume, vwap, trades, session,
          out, r, ip, prm, work):
    """Advance symbol ``s`` from state ``prev`` over input row ``j`` into ``st``, writing output
    row ``r``.

    A closed row (``commit``) enters the rings; the forming row leaves its fast/slow %K in
    ``work`` for when it closes.
    """
    for f in range(st.shape[0]):
        st[f] = prev[f]
    if trades[j, s] <= 0:
        for k in range(out.shape[1]):
            out[r, k, s] = np.nan
        return
    ns, ne, prsi, mf, msl, msg, pbb, kf, ks, kd, patr, padx, pvol, nbdev = prm
    oe = 1 + ns
    t0 = oe + ne
    ko = ns + ne  # first output after the averages
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
        work[_W_FK, s] = fk
        work[_W_SK, s] = sk
    else:
        rings[_C, cur, s] = c
        rings[_H, cur, s] = h
        rings[_L, cur, s] = lo
        rings[_V, cur, s] = v
        rings[_FK, cur, s] = fk
        rings[_SK, cur, s] = sk


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def _advance(snap, init, src, base, rings, mask, high, low, close, volume, vwap, trades, session,
             out, row0, ip, fp, n_sym, work, promote):
    """Advance every symbol's state over the closed rows ``high .. trades``, from slot ``src``
    (-1: ``init``), leaving row ``j``'s state in slot ``(base + j) % cap``.

    ``promote``: the first row is the forming bar last computed by :func:`_forming`, closed
    unchanged; it is committed from that computation's state instead of recomputed.
    """
    cap = snap.shape[0] - 1
    width = snap.shape[2]
    new = work[_w_state(ip) + width :]
    prm = _periods(ip, fp)
    for s in range(n_sym):
        prev = snap[src, s] if src >= 0 else init
        for j in range(close.shape[0]):
            st = snap[(base + j) % cap, s]
            if promote and j == 0:
                for f in range(width):
                    st[f] = new[f, s]
                if trades[0, s] > 0:
                    cur = (np.int64(st[0]) - 1) & mask
                    rings[_C, cur, s] = close[0, s]
                    rings[_H, cur, s] = high[0, s]
                    rings[_L, cur, s] = low[0, s]
                    rings[_V, cur, s] = volume[0, s]
                    rings[_FK, cur, s] = work[_W_FK, s]
                    rings[_SK, cur, s] = work[_W_SK, s]
            else:
                _step(prev, st, s, j, True, rings, mask, high, low, close, volume, vwap, trades,
                      session, out, row0 + j, ip, prm, work)
            prev = st


# The forming row. Its committed inputs -- the state after the last closed row, the previous
# bar, the values leaving each window, the Bollinger window, the stochastic's highest high and
# lowest low of the earlier bars -- are gathered once per committed state into rows of ``work``
# (one row per quantity, symbols along it); each update of the forming bar is then straight-line
# arithmetic per symbol over contiguous runs, which LLVM vectorizes. Symbols still warming up,
# without a bar, or whose values could make the order of max/min matter (NaN, signed zeros) take
# the general step.
(_W_FK, _W_SK, _W_VAR, _W_OK, _W_PC, _W_PH, _W_PL, _W_VOUT, _W_FKOUT, _W_SKOUT, _W_HH, _W_LL, _W_TR,
 _W_REDO, _W_PDM, _W_MDM, _W_ADXTR) = range(17)
_W_SMA = 17  # then one row per SMA (the close leaving it), the Bollinger window, the two states


@numba.njit(inline="always")
def _w_state(ip):
    """First ``work`` row of the committed state (then the forming state)."""
    return _W_SMA + ip[0] + ip[6] - 1


@numba.njit(inline="always")
def _plain(x):
    """Whether max/min over ``x`` and other plain values is independent of their order."""
    return (not np.isnan(x)) & (x != 0.0)


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def _prepare(snap, init, src, rings, mask, ip, fp, work, n_sym):
    """Gather the forming row's committed inputs of every symbol from slot ``src`` (-1: ``init``)."""
    ns, ne, prsi, _, msl, msg, pbb, kf, ks, kd, patr, padx, pvol, _ = _periods(ip, fp)
    ready = max(prsi + 1, msl + msg - 1, pbb - 1, kf + ks + kd - 3, patr + 1, 2 * padx, pvol - 1)
    for i in range(ne):
        ready = max(ready, ip[13 + ns + i])
    width = snap.shape[2]
    wb, ws = _W_SMA + ns, _w_state(ip)
    old = work[ws : ws + width]
    for f in range(width):
        if src >= 0:
            for s in range(n_sym):
                old[f, s] = snap[src, s, f]
        else:
            old[f, :n_sym] = init[f]
    # (work row, ring, lag): the ring value ``lag`` bars before the forming one
    for w, kind, lag in ((_W_PC, _C, 1), (_W_PH, _H, 1), (_W_PL, _L, 1), (_W_VOUT, _V, pvol - 1),
                         (_W_FKOUT, _FK, ks - 1), (_W_SKOUT, _SK, kd - 1)):
        for s in range(n_sym):
            work[w, s] = rings[kind, (np.int64(old[0, s]) - lag) & mask, s]
    for i in range(ns):
        for s in range(n_sym):
            work[_W_SMA + i, s] = rings[_C, (np.int64(old[0, s]) - ip[13 + i] + 1) & mask, s]
    for q in range(pbb - 1):
        for s in range(n_sym):
            work[wb + q, s] = rings[_C, (np.int64(old[0, s]) - pbb + 1 + q) & mask, s]
    t0 = 1 + ns + ne
    for s in range(n_sym):  # ADX: the decay of its Wilder sums does not depend on the new bar
        pdm, mdm, a = old[t0 + 8, s], old[t0 + 9, s], old[t0 + 10, s]
        work[_W_PDM, s] = pdm - pdm / padx
        work[_W_MDM, s] = mdm - mdm / padx
        work[_W_ADXTR, s] = a - a / padx
    for s in range(n_sym):  # highest high / lowest low of the earlier bars in the %K window
        n = np.int64(old[0, s])
        hh, ll = rings[_H, (n - kf + 1) & mask, s], rings[_L, (n - kf + 1) & mask, s]
        plain = _plain(hh) & _plain(ll)
        for q in range(n - kf + 2, n):
            x, y = rings[_H, q & mask, s], rings[_L, q & mask, s]
            plain &= _plain(x) & _plain(y)
            hh, ll = max(hh, x), min(ll, y)
        work[_W_HH, s] = hh
        work[_W_LL, s] = ll
        work[_W_OK, s] = 1.0 if n >= ready and plain else 0.0


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def _forming(snap, init, src, rings, mask, high, low, close, volume, vwap, trades, session, out,
             r, ip, fp, n_sym, work, prepare):
    """Compute the forming row (inputs: one-row arrays) from slot ``src`` (-1: ``init``) into
    the forming state rows of ``work``, with the same operations as :func:`_step`.
    ``prepare``: gather the committed inputs first.

    One short loop per indicator, so that each stays within what LLVM will vectorize (a few
    arrays, no calls); ``work`` carries what two loops share. A symbol without a bar keeps its
    state and gets NaN.
    """
    if prepare:
        _prepare(snap, init, src, rings, mask, ip, fp, work, n_sym)
    cap = snap.shape[0] - 1
    width = snap.shape[2]
    ns, ne, prsi, mf, msl, msg, pbb, kf, ks, kd, patr, padx, pvol, nbdev = _periods(ip, fp)
    oe = 1 + ns
    t0 = oe + ne
    ko = ns + ne
    wb = _W_SMA + ns
    ws = _w_state(ip)
    old, new, o, w = work[ws : ws + width], work[ws + width : ws + 2 * width], out[r], work
    h_, l_, c_, v_, k_ = high[0], low[0], close[0], volume[0], trades[0]
    nan = np.nan
    for s in range(n_sym):
        new[0, s] = old[0, s] + 1.0 if k_[s] > 0 else old[0, s]
    for i in range(ns):  # SMAs, warming up or not
        p, f = ip[13 + i], 1 + i
        for s in range(n_sym):
            bar, warm = k_[s] > 0, old[0, s] < p - 1
            t = old[f, s] + c_[s]
            new[f, s] = (t if warm else t - w[_W_SMA + i, s]) if bar else old[f, s]
            o[i, s] = t / p if bar and not warm else nan
    # The other indicators are past their warm-up.
    for i in range(ne):  # EMAs
        f, alpha = oe + i, 2.0 / (ip[13 + ns + i] + 1)
        for s in range(n_sym):
            e = (c_[s] - old[f, s]) * alpha + old[f, s] if k_[s] > 0 else old[f, s]
            new[f, s] = e
            o[ns + i, s] = e if k_[s] > 0 else nan
    for s in range(n_sym):  # RSI
        bar, d = k_[s] > 0, c_[s] - w[_W_PC, s]
        gain, loss = old[t0 + 5, s] * (prsi - 1), old[t0 + 6, s] * (prsi - 1)
        loss = (loss - d if d < 0 else loss) / prsi
        gain = (gain if d < 0 else gain + d) / prsi
        new[t0 + 5, s] = gain if bar else old[t0 + 5, s]
        new[t0 + 6, s] = loss if bar else old[t0 + 6, s]
        t = gain + loss
        o[ko, s] = (0.0 if _is_zero(t) else 100.0 * (gain / t)) if bar else nan
    a_fast, a_slow, a_sig = 2.0 / (mf + 1), 2.0 / (msl + 1), 2.0 / (msg + 1)
    for s in range(n_sym):  # MACD
        bar, c, fa, sl, sg = k_[s] > 0, c_[s], old[t0 + 2, s], old[t0 + 3, s], old[t0 + 4, s]
        fa2 = (c - fa) * a_fast + fa
        sl2 = (c - sl) * a_slow + sl
        x = fa2 - sl2
        sg2 = (x - sg) * a_sig + sg
        new[t0 + 2, s] = fa2 if bar else fa
        new[t0 + 3, s] = sl2 if bar else sl
        new[t0 + 4, s] = sg2 if bar else sg
        o[ko + 1, s] = x if bar else nan
        o[ko + 2, s] = sg2 if bar else nan
        o[ko + 3, s] = x - sg2 if bar else nan
    for s in range(n_sym):  # Bollinger middle, then the deviation over the window in order
        t = old[t0 + 1, s] + c_[s]
        new[t0 + 1, s] = t - w[wb, s] if k_[s] > 0 else old[t0 + 1, s]
        o[ko + 5, s] = t / pbb if k_[s] > 0 else nan
        w[_W_VAR, s] = 0.0
    q = 0
    while q < pbb - 1:  # four closes a pass where there are four left
        if q + 4 <= pbb - 1:
            for s in range(n_sym):
                mid, var = o[ko + 5, s], w[_W_VAR, s]
                d = w[wb + q, s] - mid
                var += d * d
                d = w[wb + q + 1, s] - mid
                var += d * d
                d = w[wb + q + 2, s] - mid
                var += d * d
                d = w[wb + q + 3, s] - mid
                w[_W_VAR, s] = var + d * d
            q += 4
        else:
            for s in range(n_sym):
                d = w[wb + q, s] - o[ko + 5, s]
                w[_W_VAR, s] += d * d
            q += 1
    for s in range(n_sym):
        c, mid = c_[s], o[ko + 5, s]
        dev = np.sqrt((w[_W_VAR, s] + (c - mid) * (c - mid)) / pbb) * nbdev
        o[ko + 4, s] = mid + dev
        o[ko + 6, s] = mid - dev
    for s in range(n_sym):  # fast %K
        hh, ll = max(h_[s], w[_W_HH, s]), min(l_[s], w[_W_LL, s])
        diff = (hh - ll) / 100.0
        fk = (c_[s] - ll) / diff
        w[_W_FK, s] = fk if diff != 0.0 else 0.0
    for s in range(n_sym):  # slow %K
        t = old[t0 + 12, s] + w[_W_FK, s]
        new[t0 + 12, s] = t - w[_W_FKOUT, s] if k_[s] > 0 else old[t0 + 12, s]
        w[_W_SK, s] = t / ks
    for s in range(n_sym):  # slow %D
        bar, sk = k_[s] > 0, w[_W_SK, s]
        t = old[t0 + 13, s] + sk
        new[t0 + 13, s] = t - w[_W_SKOUT, s] if bar else old[t0 + 13, s]
        sdv = t / kd
        o[ko + 7, s] = sk if bar & (not np.isnan(sdv)) else nan
        o[ko + 8, s] = sdv if bar else nan
    for s in range(n_sym):  # ATR
        bar, tr = k_[s] > 0, _true_range(h_[s], l_[s], w[_W_PC, s])
        atr = (old[t0 + 7, s] * (patr - 1) + tr) / patr
        new[t0 + 7, s] = atr if bar else old[t0 + 7, s]
        o[ko + 9, s] = atr if bar else nan
        w[_W_TR, s] = tr
    for s in range(n_sym):  # ADX: directional movement
        bar, dp, dm = k_[s] > 0, h_[s] - w[_W_PH, s], w[_W_PL, s] - l_[s]
        pdm, mdm = w[_W_PDM, s], w[_W_MDM, s]
        minus, plus = (dm > 0) & (dp < dm), (dp > 0) & (dp > dm)  # at most one holds
        new[t0 + 8, s] = (pdm + dp if plus else pdm) if bar else old[t0 + 8, s]
        new[t0 + 9, s] = (mdm + dm if minus else mdm) if bar else old[t0 + 9, s]
    for s in range(n_sym):  # ADX: its true range, DX and average
        bar, a, ax = k_[s] > 0, old[t0 + 10, s], old[t0 + 11, s]
        a2 = w[_W_ADXTR, s] + w[_W_TR, s]
        mdi = 100.0 * (new[t0 + 9, s] / a2)
        pdi = 100.0 * (new[t0 + 8, s] / a2)
        t = mdi + pdi
        dx = 100.0 * (abs(mdi - pdi) / t)
        ax2 = ax if _is_zero(a2) or _is_zero(t) else (ax * (padx - 1) + dx) / padx
        new[t0 + 10, s] = a2 if bar else a
        new[t0 + 11, s] = ax2 if bar else ax
        o[ko + 10, s] = ax2 if bar else nan
    for s in range(n_sym):  # volume SMA
        t = old[t0, s] + v_[s]
        new[t0, s] = t - w[_W_VOUT, s] if k_[s] > 0 else old[t0, s]
        o[ko + 11, s] = t / pvol if k_[s] > 0 else nan
    day = session[0]
    for s in range(n_sym):  # session VWAP
        same = old[t0 + 14, s] == day or k_[s] <= 0
        pv = (old[t0 + 15, s] if same else 0.0) + vwap[0, s] * v_[s]
        vv = (old[t0 + 16, s] if same else 0.0) + v_[s]
        new[t0 + 14, s] = old[t0 + 14, s] if same else day
        new[t0 + 15, s] = pv if k_[s] > 0 else old[t0 + 15, s]
        new[t0 + 16, s] = vv if k_[s] > 0 else old[t0 + 16, s]
        o[ko + 12, s] = pv / vv if k_[s] > 0 else nan
    redo = 0
    for s in range(n_sym):  # symbols with a bar still warming up, or with NaN/zero highs or lows
        again = k_[s] > 0 and not (w[_W_OK, s] != 0.0 and _plain(h_[s]) & _plain(l_[s]))
        w[_W_REDO, s] = 1.0 if again else 0.0
        redo += again
    if redo:  # ... are redone by the general step
        prm = (ns, ne, prsi, mf, msl, msg, pbb, kf, ks, kd, patr, padx, pvol, nbdev)
        for s in range(n_sym):
            if w[_W_REDO, s] != 0.0:
                st = snap[cap, s]
                _step(snap[src, s] if src >= 0 else init, st, s, 0, False, rings, mask, high, low,
                      close, volume, vwap, trades, session, out, r, ip, prm, work)
                for f in range(width):
                    new[f, s] = st[f]


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
        self._work_rows = _W_SMA + len(self.config.sma) + self.config.bbands[0] - 1 + 2 * self._width
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
        # The forming row's inputs gathered from the committed state, its own state, and scratch
        # (see _forming); _work_key: the (state generation, slot, symbols) gathered for.
        self._work = np.zeros((self._work_rows, n_sym))
        self._work_key: tuple | None = None
        # (bar time, state generation, buffer row, symbols) of the forming row last computed:
        # when that bar closes unchanged, its state is committed as computed.
        self._forming_key: tuple | None = None
        self._forming_session: tuple = (None, None)  # (bar time, session number)
        # (first bar time, last closed bar time, rows, symbols) after an update with a forming
        # row: while these stay the same, an update recomputes that row alone.
        self._settled: tuple | None = None
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
        work = np.zeros((self._work_rows, new))
        work[:, :old] = self._work
        self._snap, self._rings, self._out, self._work = snap, rings, out, work

    def _make_room(self, keep: int, rows: int) -> None:
        """Ensure rows ``r0 .. r0 + rows`` fit, keeping the first ``keep`` of the current rows."""
        if self._r0 + rows <= len(self._out):
            return
        cap = len(self._out) if rows <= len(self._out) // 2 else 2 * rows
        out = self._out if cap == len(self._out) else np.full((cap,) + self._out.shape[1:], np.nan)
        times = self._times if cap == len(self._times) else np.zeros(cap, dtype=np.int64)
        r0 = self._r0
        self._forming_key = None  # the forming row's outputs are not carried over
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
        times = np.asarray(times)
        if times.dtype != np.int64:
            times = times.view(np.int64)
        close = fields["close"]
        n_rows, n_sym = close.shape
        if (forming and start >= n_rows - 1 and n_rows > 1
                and self._settled == (times.item(0), times.item(n_rows - 2), n_rows, n_sym)):
            # Only the forming bar changed, as after most batches: recompute it alone.
            self._compute_forming(times, fields, (self._head + self._count - 1) % self._cap)
            self.changed_from = n_rows - 1
            return
        self._settled = None
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
        key = (times.item(begin), self._gen, self._r0 + begin, n_sym) if n_commit else None
        promote = bool(n_commit and start > begin and self._forming_key == key)
        self._forming_key = None
        if n_commit:
            rows = slice(begin, begin + n_commit)
            _advance(self._snap, self._init, src, self._head + self._count, self._rings,
                     self._ring_len - 1, fields["high"][rows], fields["low"][rows], close[rows],
                     fields["volume"][rows], fields["vwap"][rows], fields["trades"][rows],
                     self._sessions(times[rows]), self._out, self._r0 + begin, self._ip, self._fp,
                     n_sym, self._work, promote)
            self._times[self._r0 + begin : self._r0 + begin + n_commit] = times[rows]
            self._commit(times[rows])
            src = (self._head + self._count - 1) % self._cap
        if n_commit < m:
            self._compute_forming(times, fields, src)
        self._rows = n_rows
        self._forming = bool(forming and n_rows)
        self.changed_from = begin
        if forming and n_rows > 1:
            self._settled = (times.item(0), times.item(n_rows - 2), n_rows, n_sym)

    def _compute_forming(self, times: np.ndarray, fields: dict[str, np.ndarray], src: int) -> None:
        """Compute the last row, the forming bar, from state slot ``src`` without committing it."""
        row, r = len(times) - 1, self._r0 + len(times) - 1
        t = times.item(row)
        if self._forming_session[0] != t:
            self._forming_session = (t, self._sessions(times[row:]))
        work_key = (self._gen, src, self._n_sym)
        rows = slice(row, row + 1)
        _forming(self._snap, self._init, src, self._rings, self._ring_len - 1, fields["high"][rows],
                 fields["low"][rows], fields["close"][rows], fields["volume"][rows],
                 fields["vwap"][rows], fields["trades"][rows], self._forming_session[1], self._out,
                 r, self._ip, self._fp, self._n_sym, self._work, work_key != self._work_key)
        self._work_key = work_key
        self._times[r] = t
        self._forming_key = (t, self._gen, r, self._n_sym)

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
