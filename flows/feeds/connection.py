"""Resilient websocket feeds, shared by every venue: reconnect, idle timeout, circuit breaker.

A venue module subclasses :class:`WebsocketFeed` and supplies three things: the URL for a set
of subscriptions, the messages that (re)subscribe on a live connection, and ``parse(frame)``.
Everything else is here, once:

- **Reconnect** with :class:`Backoff` -- exponential, full jitter, capped -- reset only after
  a connection has stayed healthy (frames arriving) for ``healthy_after_s``.
- **Idle timeout**: no frame at all for ``idle_s`` -> ``STALE`` -> close and reconnect. The
  timeout is per connection, never per symbol (a quiet symbol is not a dead feed); server
  pings do not count as frames and are answered by tornado.
- **Resubscribe** exactly the current subscriptions after every reconnect (they are part of
  the URL or replayed as messages).
- **Circuit breaker** (:class:`CircuitBreaker`): ``max_failures`` failed attempts within
  ``failure_window_s``, a fatal close code (bad auth, policy violation), a refused handshake
  (HTTP 401/403/...) or a frame saying retrying cannot help (the parser calls
  :meth:`WebsocketFeed.give_up`: Polygon's ``auth_failed``, a Coinbase ``error``) mark the feed
  ``FAILED`` with a reason instead of looping silently.
- **Bounded queue** between the IOLoop thread (reads, parses) and a consumer thread (calls
  ``sink(batch, quarantine)``, usually :meth:`flows.pipeline.Flow.push`): when the sink falls
  behind, whole frames are dropped and counted, the socket is never blocked.
- **Oversized frames**: above ``max_frame_bytes`` a frame is quarantined (first 500 characters
  kept) and the stream continues; above ``hard_max_frame_bytes`` tornado resets the
  connection (close 1009) and the feed reconnects.
- **Health** (:class:`~flows.feeds.health.HealthTracker`): state, rates, lag percentiles,
  reconnects, trade-id gaps and overlap (duplicates are dropped by the flow's validator; the
  feed only counts them), drops, last error.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.ioloop import IOLoop
from tornado.websocket import (
    WebSocketClientConnection,
    WebSocketClosedError,
    websocket_connect,
)

from flows.feeds.health import FeedHealth, HealthTracker
from flows.schema import NO_ID, Quarantine, TradeBatch

__all__ = ["Backoff", "CircuitBreaker", "ConnectionConfig", "Sink", "WebsocketFeed"]

log = logging.getLogger(__name__)

#: ``sink(batch, unparsed)`` -- :meth:`flows.pipeline.Flow.push` fits.
Sink = Callable[[TradeBatch, Quarantine], None]


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is ``uniform(0, min(cap, base * 2**n))``.

    Parameters
    ----------
    base : ceiling of the first delay, s.
    cap : largest ceiling, s.
    rng : source of the jitter (``random.Random(seed)`` in tests).

    Examples
    --------
    >>> b = Backoff(0.5, 4.0, random.Random(0))
    >>> [b.ceiling_after(n) for n in range(5)]
    [0.5, 1.0, 2.0, 4.0, 4.0]
    >>> all(0 <= b.next_delay() <= c for c in (0.5, 1.0, 2.0, 4.0, 4.0))
    True
    >>> b.reset(); b.attempt
    0
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base}, cap={cap}")
        self.base, self.cap = base, cap
        self.rng = rng or random.Random()
        self.attempt = 0

    def ceiling_after(self, n: int) -> float:
        """The ceiling of the delay after ``n`` consecutive failures."""
        return min(self.cap, self.base * 2.0 ** min(n, 62))

    def ceiling(self) -> float:
        """The ceiling the next delay is drawn under."""
        return self.ceiling_after(self.attempt)

    def next_delay(self) -> float:
        """Draw the next delay and count the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from ``base`` (after a connection stayed healthy)."""
        self.attempt = 0


class CircuitBreaker:
    """Trip after ``max_failures`` failures within ``window_s`` seconds.

    Examples
    --------
    >>> now = [0.0]
    >>> cb = CircuitBreaker(3, 60.0, clock=lambda: now[0])
    >>> cb.record_failure(), cb.record_failure()
    (False, False)
    >>> now[0] = 61.0   # the first two fell out of the window
    >>> cb.record_failure(), cb.record_failure(), cb.record_failure()
    (False, False, True)
    """

    def __init__(self, max_failures: int = 10, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, got {max_failures}")
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: list[float] = []

    @property
    def failures(self) -> int:
        """Failures inside the window right now."""
        lo = self.clock() - self.window_s
        self._failures = [t for t in self._failures if t >= lo]
        return len(self._failures)

    def record_failure(self) -> bool:
        """Count one failure; return True when the breaker trips."""
        self._failures.append(self.clock())
        return self.failures >= self.max_failures

    def reset(self) -> None:
        self._failures.clear()


@dataclass(frozen=True)
class ConnectionConfig:
    """How a websocket feed connects, waits and gives up.

    Parameters
    ----------
    idle_s : no frame at all for this long -> STALE -> reconnect.
    connect_timeout_s : TCP + websocket handshake.
    backoff_base_s, backoff_cap_s : see :class:`Backoff`.
    healthy_after_s : a connection that delivered frames this long resets backoff and breaker.
    max_failures, failure_window_s : see :class:`CircuitBreaker`.
    max_session_s : reconnect on our own schedule before the venue drops us (Binance closes
        every connection after 24 h); None never.
    queue_frames : frames buffered between the reader and the sink before frames are dropped.
    max_frame_bytes : larger frames are quarantined unparsed.
    hard_max_frame_bytes : larger frames make tornado reset the connection (close 1009).
    ping_interval_s : send our own pings (tornado closes the connection when no pong arrives
        within ``ping_interval_s``); None leaves liveness to the idle timeout.
    fatal_close_codes : close codes that mean "do not retry" (policy violation = bad auth, ...).
    fatal_http_codes : handshake statuses that mean "do not retry".
    """

    idle_s: float = 30.0
    connect_timeout_s: float = 10.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    healthy_after_s: float = 30.0
    max_failures: int = 10
    failure_window_s: float = 300.0
    max_session_s: float | None = None
    queue_frames: int = 100_000
    max_frame_bytes: int = 1 << 20
    hard_max_frame_bytes: int = 16 << 20
    ping_interval_s: float | None = None
    fatal_close_codes: frozenset[int] = frozenset({1002, 1003, 1007, 1008, 1010, 4001, 4003})
    fatal_http_codes: frozenset[int] = frozenset({400, 401, 403, 404, 410})

    def __post_init__(self) -> None:
        for name in ("idle_s", "connect_timeout_s", "healthy_after_s", "failure_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_frame_bytes > self.hard_max_frame_bytes:
            raise ValueError("max_frame_bytes must not exceed hard_max_frame_bytes")
        if self.queue_frames < 1:
            raise ValueError(f"queue_frames must be at least 1, got {self.queue_frames}")


class _Outcome:
    """How one connection ended."""

    def __init__(self, reason: str, fatal: bool = False, healthy: bool = False):
        self.reason, self.fatal, self.healthy = reason, fatal, healthy


_END = object()
#: most frames held before they are queued (see ``WebsocketFeed._held``)
_HOLD_FRAMES = 256


class WebsocketFeed:
    """A websocket feed running its own tornado IOLoop in a thread, pushing into ``sink``.

    Subclasses implement :meth:`url`, :meth:`parse` and, for venues that subscribe by message,
    :meth:`subscribe_messages` / :meth:`unsubscribe_messages`.

    Parameters
    ----------
    sink : ``sink(batch, unparsed)``, called from the feed's consumer thread.
    subscriptions : initial stream names (venue-specific).
    config : connection settings.
    name : feed name in health reports.
    clock : monotonic seconds; ``wall_ns`` receive timestamps (ns since the epoch).
    rng : jitter source of the backoff.
    on_state : called with each new state (e.g. to set ``flow.feed_state``).

    Attributes
    ----------
    contiguous_ids : class attribute; True when the venue numbers every trade of a symbol
        one after the other, so a jump in ``trade_id`` is a lost trade (health ``gaps``).
        False for ids that only increase (Polygon's ``q``): no gap or overlap is inferred.
    failure : the reason the feed FAILED, or None.
    """

    name = "websocket"
    contiguous_ids = True

    def __init__(self, sink: Sink, subscriptions: Iterable[str] = (), *,
                 config: ConnectionConfig | None = None, name: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns, rng: random.Random | None = None,
                 on_state: Callable[[str], None] | None = None):
        self.sink = sink
        self.config = config or ConnectionConfig()
        self.name = name or self.name
        self.clock, self.wall_ns = clock, wall_ns
        self.tracker = HealthTracker(self.name, clock=clock, on_state=on_state)
        self.backoff = Backoff(self.config.backoff_base_s, self.config.backoff_cap_s, rng)
        self.breaker = CircuitBreaker(self.config.max_failures, self.config.failure_window_s, clock)
        self._subs: dict[str, None] = dict.fromkeys(subscriptions)
        self.check_subscriptions(list(self._subs))
        #: set by ``parse`` to have :meth:`after_sink` run after this frame
        self.wake_consumer = False
        self._subs_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(self.config.queue_frames)
        self._pending = 0
        self._pending_cv = threading.Condition()
        #: parsed frames not yet queued: released as one item when the socket has no frame
        #: buffered (or at ``_HOLD_FRAMES``), so a burst costs one hand-off, not one a frame
        self._held: list[tuple[TradeBatch, Quarantine]] = []
        self._stop = threading.Event()
        self._loop: IOLoop | None = None
        self._wake: asyncio.Event | None = None
        self._conn: WebSocketClientConnection | None = None
        self._reader: threading.Thread | None = None
        self._consumer: threading.Thread | None = None
        self._give_up: str | None = None
        self.failure: str | None = None

    # -- what a venue supplies --------------------------------------------------------------

    def url(self, subscriptions: Sequence[str]) -> str:
        """The websocket URL to open for ``subscriptions``."""
        raise NotImplementedError

    def subscribe_messages(self, streams: Sequence[str], on_connect: bool) -> list[str]:
        """Messages that subscribe ``streams`` (``on_connect``: just after connecting)."""
        return []

    def unsubscribe_messages(self, streams: Sequence[str]) -> list[str]:
        return []

    def parse(self, message: str | bytes, recv_ns: int) -> tuple[TradeBatch, Quarantine]:
        """Turn one frame into trades and quarantine records; never raise for bad input."""
        raise NotImplementedError

    def after_sink(self) -> None:
        """Called in the consumer thread after each push (cross-checks that need the flow).

        A parser that kept something for it (a closed kline) sets ``self.wake_consumer`` so
        the call happens even when its frame carried no trade."""

    def check_subscriptions(self, streams: Sequence[str]) -> None:
        """Raise (a :class:`~flows.feeds.FeedError`) when ``streams`` cannot be subscribed together."""

    def give_up(self, reason: str) -> None:
        """Mark the feed FAILED with ``reason`` after the current frame; do not reconnect.

        For :meth:`parse` (on the IOLoop thread) when the venue says that sending the same
        request again cannot succeed -- a rejected API key, a refused subscription.
        """
        self._give_up = reason

    # -- control ---------------------------------------------------------------------------

    @property
    def subscriptions(self) -> list[str]:
        with self._subs_lock:
            return list(self._subs)

    def subscribe(self, streams: Iterable[str]) -> None:
        """Add streams now (on the live connection) and on every reconnect."""
        new = [s for s in streams if s not in self._subs]
        self.check_subscriptions(self.subscriptions + new)
        with self._subs_lock:
            self._subs.update(dict.fromkeys(new))
        if new:
            self._send_later(self.subscribe_messages(new, on_connect=False))

    def unsubscribe(self, streams: Iterable[str]) -> None:
        gone = [s for s in streams if s in self._subs]
        with self._subs_lock:
            for s in gone:
                del self._subs[s]
        if gone:
            self._send_later(self.unsubscribe_messages(gone))

    def _send_later(self, messages: list[str]) -> None:
        loop = self._loop
        if messages and loop is not None:
            loop.add_callback(self._send, messages)

    async def _send(self, messages: list[str]) -> None:
        conn = self._conn
        if conn is None:
            return  # not connected: the next connect subscribes everything anyway
        try:
            for m in messages:
                await conn.write_message(m)
        except WebSocketClosedError:
            pass

    def start(self) -> WebsocketFeed:
        """Start the reader (IOLoop) and consumer threads; return self."""
        if self._reader is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._consumer = threading.Thread(target=self._consume, name=f"{self.name}-sink", daemon=True)
        self._reader = threading.Thread(target=self._read_thread, name=f"{self.name}-ws", daemon=True)
        self._consumer.start()
        self._reader.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection, deliver what was already received, and stop both threads."""
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.add_callback(wake.set)
        if self._reader is not None:
            self._reader.join(timeout)
        if self._consumer is not None:
            self._consumer.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the feed ends (stopped or FAILED)."""
        if self._reader is not None:
            self._reader.join(timeout)
        if self._consumer is not None and not (self._reader and self._reader.is_alive()):
            self._consumer.join(timeout)

    def is_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def health(self) -> FeedHealth:
        return self.tracker.snapshot()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued frame has reached the sink; False on timeout."""
        with self._pending_cv:
            return self._pending_cv.wait_for(lambda: self._pending == 0, timeout)

    def wait_for_state(self, states: str | Iterable[str], timeout: float = 10.0) -> bool:
        """Wait until the feed is in one of ``states``; False on timeout."""
        return self.tracker.wait_for_state(states, timeout)

    # -- the consumer thread ----------------------------------------------------------------

    def _consume(self) -> None:
        while True:
            items = [self._queue.get()]
            while items[-1] is not _END and len(items) < 1024:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = items[-1] is _END
            work = items[:-1] if done else items
            if work:
                batch = TradeBatch.concat([b for b, _ in work])
                unparsed = Quarantine.concat([q for _, q in work])
                try:
                    if len(batch) or len(unparsed):
                        self.sink(batch, unparsed)
                    self.after_sink()
                except Exception as exc:  # the feed survives a failing sink; the loss is counted
                    log.exception("%s: sink failed", self.name)
                    self.tracker.dropped(len(work), len(batch) + len(unparsed))
                    self.tracker.error(f"sink failed: {type(exc).__name__}: {exc}")
                with self._pending_cv:
                    self._pending -= len(work)
                    self._pending_cv.notify_all()
            if done:
                return

    def _release(self) -> None:
        """Queue the held frames as one item (the consumer's batch)."""
        if not self._held:
            return
        held, self._held = self._held, []
        if len(held) == 1:
            batch, unparsed = held[0]
        else:
            batch = TradeBatch.concat([b for b, _ in held])
            unparsed = Quarantine.concat([q for _, q in held])
        with self._pending_cv:
            self._pending += 1
        try:
            self._queue.put_nowait((batch, unparsed))
        except queue.Full:
            with self._pending_cv:
                self._pending -= 1
                self._pending_cv.notify_all()
            self.tracker.dropped(len(held), len(batch) + len(unparsed))

    # -- the IOLoop thread ------------------------------------------------------------------

    def _read_thread(self) -> None:
        loop = IOLoop(make_current=False)
        self._loop = loop
        try:
            loop.run_sync(self._run)
        except Exception as exc:  # a bug in here must not leave the feed silently dead
            log.exception("%s: feed loop crashed", self.name)
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._loop = None
            loop.close(all_fds=True)
            self._queue.put(_END)  # blocks only while the consumer drains a full queue

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.tracker.set_state("FAILED", reason)
        log.error("%s: FAILED: %s", self.name, reason)

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        if self._stop.is_set():
            self._wake.set()
        stop = asyncio.ensure_future(self._wake.wait())
        try:
            while not self._stop.is_set():
                outcome = await self._attempt(stop)
                if self._give_up is not None:
                    outcome = _Outcome(f"{self._give_up}; not retrying", fatal=True)
                if self._stop.is_set():
                    break
                if outcome.fatal:
                    self._fail(outcome.reason)
                    return
                if outcome.healthy:
                    self.backoff.reset()
                elif self.breaker.record_failure():
                    self._fail(f"{self.breaker.failures} failed connections within "
                               f"{self.config.failure_window_s:g} s; last: {outcome.reason}")
                    return
                ceiling = self.backoff.ceiling()
                delay = self.backoff.next_delay()
                self.tracker.backoff(delay, ceiling)
                self.tracker.set_state("BACKOFF", outcome.reason)
                await asyncio.wait([stop], timeout=delay)
            self.tracker.set_state("STOPPED")
        finally:
            stop.cancel()

    async def _attempt(self, stop: asyncio.Future) -> _Outcome:
        self.tracker.set_state("CONNECTING")
        request = HTTPRequest(self.url(self.subscriptions), connect_timeout=self.config.connect_timeout_s,
                              request_timeout=self.config.connect_timeout_s)
        connecting = asyncio.ensure_future(websocket_connect(
            request, ping_interval=self.config.ping_interval_s,
            max_message_size=self.config.hard_max_frame_bytes))
        await asyncio.wait([connecting, stop], return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            return _Outcome("stopped")
        try:
            conn = connecting.result()
        except HTTPClientError as exc:
            fatal = exc.code in self.config.fatal_http_codes
            why = f"handshake refused: HTTP {exc.code} {exc.message or ''}".strip()
            return _Outcome(why + ("; not retrying" if fatal else ""), fatal=fatal)
        except (OSError, TimeoutError) as exc:
            return _Outcome(f"connect failed: {type(exc).__name__}: {exc}")
        except Exception as exc:  # StreamClosedError and friends: retry
            return _Outcome(f"connect failed: {type(exc).__name__}: {exc}")
        try:
            return await self._session(conn, stop)
        finally:
            self._release()
            self._conn = None
            conn.close()

    async def _session(self, conn: WebSocketClientConnection, stop: asyncio.Future) -> _Outcome:
        cfg = self.config
        opened = self.clock()
        healthy = False
        self._conn = conn
        self.tracker.connected()
        for m in self.subscribe_messages(self.subscriptions, on_connect=True):
            await conn.write_message(m)
        self.tracker.set_state("LIVE")
        reading = conn.read_message()
        while True:
            timeout = cfg.idle_s
            if cfg.max_session_s is not None:
                timeout = min(timeout, max(0.0, opened + cfg.max_session_s - self.clock()))
            # A frame already buffered is taken at once: waiting on it (a task and a timer per
            # frame) cost more than parsing it. Only an empty buffer waits, with the timeouts.
            done = (reading,) if reading.done() and timeout > 0 else ()
            if not done:
                self._release()  # nothing buffered: hand what was read to the consumer
                done, _ = await asyncio.wait([reading, stop], timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set():
                return _Outcome("stopped", healthy=True)
            if not done:
                if cfg.max_session_s is not None and self.clock() - opened >= cfg.max_session_s:
                    await self._close_draining(conn, reading)
                    return _Outcome(f"session rollover after {cfg.max_session_s:g} s", healthy=True)
                self.tracker.set_state("STALE", f"no frame for {cfg.idle_s:g} s")
                await self._close_draining(conn, reading)
                return _Outcome(f"no frame for {cfg.idle_s:g} s", healthy=healthy)
            message = reading.result()
            if message is None:
                code, why = conn.close_code, conn.close_reason
                text = (f"server closed the connection ({code}{': ' + why if why else ''})"
                        if code is not None else "connection lost")
                return _Outcome(text + ("; not retrying" if code in cfg.fatal_close_codes else ""),
                                fatal=code in cfg.fatal_close_codes, healthy=healthy)
            reading = conn.read_message()
            self._on_frame(message)
            if self._give_up is not None:
                return _Outcome(self._give_up, fatal=True)
            if not healthy and self.clock() - opened >= cfg.healthy_after_s:
                healthy = True
                self.backoff.reset()
                self.breaker.reset()

    async def _close_draining(self, conn: WebSocketClientConnection, reading) -> None:
        """Close, then take in frames already on their way (nothing received is thrown away)."""
        conn.close()
        while True:
            done, _ = await asyncio.wait([reading], timeout=2.0)
            if not done or reading.result() is None:
                return
            self._on_frame(reading.result())
            reading = conn.read_message()

    def _on_frame(self, message: str | bytes) -> None:
        recv_ns = self.wall_ns()
        self.tracker.frame()
        if len(message) > self.config.max_frame_bytes:
            raw = message[:500]
            raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            batch, unparsed = TradeBatch(), Quarantine.malformed([raw])
            self.tracker.error(f"frame of {len(message):,} bytes over max_frame_bytes; quarantined")
        else:
            try:
                batch, unparsed = self.parse(message, recv_ns)
            except Exception as exc:  # a parser bug must not kill the stream: quarantine the frame
                log.exception("%s: parse failed", self.name)
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                batch, unparsed = TradeBatch(), Quarantine.malformed([text])
                self.tracker.error(f"parse failed: {type(exc).__name__}: {exc}")
        if self.contiguous_ids or not len(batch):
            self.tracker.observe(batch, recv_ns)
        else:
            self.tracker.observe(replace(batch, trade_id=np.full(len(batch), NO_ID, np.int64)), recv_ns)
        if len(unparsed):
            self.tracker.quarantined(len(unparsed))
        if len(batch) or len(unparsed) or self.wake_consumer:
            self.wake_consumer = False
            self._held.append((batch, unparsed))
            if len(self._held) >= _HOLD_FRAMES:
                self._release()
