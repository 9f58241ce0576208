"""Health of a live feed, for the dashboards and the CLI: state, rates, lag, reconnects, gaps.

:class:`HealthTracker` is fed by a :class:`~flows.feeds.connection.WebsocketFeed` (from its
IOLoop thread and its consumer thread; every method is thread-safe) and hands out immutable
:class:`FeedHealth` snapshots. Every figure comes from what the feed saw itself, so it works
the same for every venue.

States
------
``CONNECTING`` opening the websocket; ``LIVE`` connected (frames flow, or the venue is quiet
for less than the idle timeout); ``STALE`` no frame at all for the idle timeout -- the feed is
about to reconnect; ``BACKOFF`` waiting before the next attempt; ``FAILED`` given up, with a
reason (a non-retryable close such as bad auth, or the circuit breaker tripped); ``STOPPED``
stopped on request.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from flows.schema import NO_ID, TradeBatch

__all__ = ["STATES", "FeedHealth", "HealthTracker"]

#: Feed states, in the order a healthy start passes through them (then the others).
STATES: tuple[str, ...] = ("CONNECTING", "LIVE", "STALE", "BACKOFF", "FAILED", "STOPPED")


@dataclass(frozen=True)
class FeedHealth:
    """One snapshot of a feed's health (what the monitor page shows).

    Attributes
    ----------
    feed : feed name (``binance-spot``, ...).
    state : one of :data:`STATES`; ``reason`` says why it was entered (None when unremarkable).
    state_for_s : seconds in the current state.
    messages_per_s, trades_per_s : frames and trades received over the last ``rate_window_s``.
    lag_ms_p50, lag_ms_p90, lag_ms_p99 : receive time minus event time of recent trades, in
        ms (None before the first trade). Includes clock skew between venue and host.
    frames, trades : totals received.
    connects : successful websocket connects; ``reconnects`` is every one after the first.
    gaps, missing_ids : trade-id gaps seen per symbol (ids jumped by more than one), and the
        ids skipped in total -- trades the venue sent while we were not listening.
    overlap : trades received again after a reconnect (ids at or below the symbol's highest
        id seen); the flow's validator counts and drops them as duplicates.
    dropped_frames, dropped_trades : thrown away because the consumer fell behind (the queue
        was full) or the sink raised.
    quarantined : unparsable records handed to the flow's quarantine.
    ignored : frames of other streams (depth, bookTicker, acks, ...) by kind.
    events : counts of quality events by kind (``trade_id_gap``, ``kline_divergence``, ...).
    last_error : the last error or close reason, with no ``None`` once something went wrong.
    """

    feed: str
    state: str
    reason: str | None
    state_for_s: float
    messages_per_s: float
    trades_per_s: float
    lag_ms_p50: float | None
    lag_ms_p90: float | None
    lag_ms_p99: float | None
    frames: int
    trades: int
    connects: int
    reconnects: int
    gaps: int
    missing_ids: int
    overlap: int
    dropped_frames: int
    dropped_trades: int
    quarantined: int
    ignored: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

    def to_dict(self) -> dict:
        """Return the snapshot as plain Python values (JSON-ready)."""
        return asdict(self)


class HealthTracker:
    """Collect a feed's health figures; thread-safe, with an injected monotonic clock.

    Parameters
    ----------
    feed : feed name.
    clock : monotonic seconds (injected in tests).
    lag_samples : size of the ring of recent lags the percentiles are taken from.
    rate_window_s : the window of ``messages_per_s`` and ``trades_per_s``.
    on_state : called with the new state on every change (from the changing thread).

    Examples
    --------
    >>> from flows.schema import NS, SymbolTable
    >>> now = [0.0]
    >>> h = HealthTracker("demo", clock=lambda: now[0])
    >>> h.set_state("LIVE")
    >>> b = TradeBatch.from_columns(SymbolTable(), time=[NS, NS], symbol=["A", "A"],
    ...                             price=[1.0, 1.0], size=[1.0, 1.0], trade_id=[1, 4])
    >>> h.frame(); h.observe(b, recv_ns=NS + 5_000_000)
    >>> now[0] = 2.0
    >>> s = h.snapshot()
    >>> s.state, s.trades, s.gaps, s.missing_ids, s.lag_ms_p50
    ('LIVE', 2, 1, 2, 5.0)
    """

    def __init__(self, feed: str, clock: Callable[[], float] = time.monotonic,
                 lag_samples: int = 4096, rate_window_s: float = 10.0,
                 on_state: Callable[[str], None] | None = None):
        self.feed = feed
        self.clock = clock
        self.rate_window_s = rate_window_s
        self.on_state = on_state
        self._lock = threading.Lock()
        self._state, self._reason, self._since = "CONNECTING", None, clock()
        #: every state change as ``(clock, state, reason)``, newest last (bounded).
        self.transitions: deque[tuple[float, str, str | None]] = deque(maxlen=1000)
        #: every backoff as ``(delay, ceiling)`` seconds, newest last (bounded).
        self.backoffs: deque[tuple[float, float]] = deque(maxlen=1000)
        #: recent quality events as dicts with a ``kind`` (bounded).
        self.recent_events: deque[dict] = deque(maxlen=1000)
        self._lags = np.full(lag_samples, np.nan)
        self._lag_next = 0
        self._frame_times: deque[float] = deque()
        self._trade_times: deque[tuple[float, int]] = deque()
        self._hwm: dict[int, int] = {}
        self._n = Counter()
        self._ignored: Counter = Counter()
        self._events: Counter = Counter()
        self._last_error: str | None = None
        self.transitions.append((self._since, self._state, None))

    # -- updates --------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def wait_for_state(self, states: str | Iterable[str], timeout: float = 10.0) -> bool:
        """Wait until the state is one of ``states``; False on timeout."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while self.state not in wanted:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def set_state(self, state: str, reason: str | None = None) -> None:
        """Enter ``state`` (one of :data:`STATES`); ``reason`` is kept as ``last_error`` too
        when the state is STALE, BACKOFF or FAILED."""
        if state not in STATES:
            raise ValueError(f"unknown feed state {state!r}; choose from {', '.join(STATES)}")
        with self._lock:
            changed = state != self._state or reason != self._reason
            self._state, self._reason = state, reason
            if changed:
                self._since = self.clock()
                self.transitions.append((self._since, state, reason))
            if reason is not None and state in ("STALE", "BACKOFF", "FAILED"):
                self._last_error = reason
        if changed and self.on_state is not None:
            self.on_state(state)

    def error(self, message: str) -> None:
        """Remember ``message`` as the last error."""
        with self._lock:
            self._last_error = message

    def connected(self) -> None:
        """Count a successful connect."""
        with self._lock:
            self._n["connects"] += 1

    def backoff(self, delay: float, ceiling: float) -> None:
        """Record one backoff delay and the ceiling it was drawn under."""
        with self._lock:
            self.backoffs.append((delay, ceiling))

    def frame(self) -> None:
        """Count one received frame."""
        with self._lock:
            self._n["frames"] += 1
            self._frame_times.append(self.clock())

    def ignored(self, kind: str) -> None:
        """Count one frame of a stream the feed does not turn into trades."""
        with self._lock:
            self._ignored[kind] += 1

    def quarantined(self, n: int) -> None:
        with self._lock:
            self._n["quarantined"] += n

    def dropped(self, frames: int, trades: int) -> None:
        """Count frames (holding ``trades`` records) thrown away before reaching the sink."""
        with self._lock:
            self._n["dropped_frames"] += frames
            self._n["dropped_trades"] += trades

    def event(self, kind: str, **detail) -> None:
        """Record a quality event (a trade-id gap, a kline divergence, ...)."""
        with self._lock:
            self._events[kind] += 1
            self.recent_events.append({"kind": kind, "at": self.clock(), **detail})

    def observe(self, batch: TradeBatch, recv_ns: int) -> None:
        """Account for the trades of one frame: rate, lag, id gaps and overlap."""
        n = len(batch)
        if not n:
            return
        lags = (recv_ns - batch.time) / 1e6
        gaps: list[tuple[int, int, int]] = []
        with self._lock:
            self._n["trades"] += n
            self._trade_times.append((self.clock(), n))
            idx = (self._lag_next + np.arange(n)) % len(self._lags)
            self._lags[idx] = lags[-len(self._lags):] if n > len(self._lags) else lags
            self._lag_next = int(idx[-1] + 1) % len(self._lags)
            for sym, tid in zip(batch.symbol.tolist(), batch.trade_id.tolist()):
                if tid == NO_ID:
                    continue
                hwm = self._hwm.get(sym)
                if hwm is None or tid > hwm:
                    if hwm is not None and tid > hwm + 1:
                        gaps.append((sym, hwm + 1, tid))
                    self._hwm[sym] = tid
                else:
                    self._n["overlap"] += 1
            for sym, first_missing, got in gaps:
                self._n["gaps"] += 1
                self._n["missing_ids"] += got - first_missing
        for sym, first_missing, got in gaps:
            self.event("trade_id_gap", symbol=sym, first_missing=first_missing, next_id=got)

    # -- reading --------------------------------------------------------------------------------

    def last_id(self, symbol: int) -> int | None:
        """The highest trade id seen for symbol code ``symbol``."""
        with self._lock:
            return self._hwm.get(symbol)

    def _rate(self, times: deque, now: float, weighted: bool) -> float:
        lo = now - self.rate_window_s
        while times and (times[0][0] if weighted else times[0]) < lo:
            times.popleft()
        total = sum(n for _, n in times) if weighted else len(times)
        return total / self.rate_window_s

    def snapshot(self) -> FeedHealth:
        """Return the current figures."""
        with self._lock:
            now = self.clock()
            lags = self._lags[~np.isnan(self._lags)]
            p50, p90, p99 = (np.percentile(lags, [50, 90, 99]).tolist() if len(lags)
                             else (None, None, None))
            n = self._n
            return FeedHealth(
                feed=self.feed, state=self._state, reason=self._reason,
                state_for_s=now - self._since,
                messages_per_s=self._rate(self._frame_times, now, False),
                trades_per_s=self._rate(self._trade_times, now, True),
                lag_ms_p50=p50, lag_ms_p90=p90, lag_ms_p99=p99,
                frames=n["frames"], trades=n["trades"], connects=n["connects"],
                reconnects=max(0, n["connects"] - 1), gaps=n["gaps"], missing_ids=n["missing_ids"],
                overlap=n["overlap"], dropped_frames=n["dropped_frames"],
                dropped_trades=n["dropped_trades"], quarantined=n["quarantined"],
                ignored=dict(self._ignored), events=dict(self._events),
                last_error=self._last_error)

    def states(self) -> list[str]:
        """The states entered so far, in order (consecutive repeats folded)."""
        with self._lock:
            out: list[str] = []
            for _, s, _ in self.transitions:
                if not out or out[-1] != s:
                    out.append(s)
            return out

