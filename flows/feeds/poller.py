"""Poll an HTTP endpoint every N seconds and hand each body to a parser; back off on failure.

:class:`HttpPoller` is the polling twin of the websocket connection layer: it fetches ``url``
on a fixed cadence, passes each ``200`` body to ``parse(body, recv_ns)`` (the same
``-> (TradeBatch, Quarantine, info)`` contract as the websocket parsers) and keeps a ``health``
dict in the same shape. Failures are handled so that a struggling server is not hammered:

- ``429 Too Many Requests``: wait what ``Retry-After`` says (seconds or an HTTP date), at least
  one interval;
- ``5xx``, timeouts and connection errors: exponential backoff with full jitter -- a delay drawn
  uniformly from ``[0, min(cap, base * 2**(n - 1))]`` after the n-th consecutive failure;
- other ``4xx`` (401, 403, 404, ...): retrying cannot help; the poller stops in ``FAILED``.

Every time source is injected (``clock``, ``sleep``, ``wall_ns``, ``rng``), so tests drive the
schedule with a fake clock and take no real time waiting.

:class:`PollingFeed` runs a poller in a thread and pushes what it parses into a sink (usually
``flow.push``), with the same surface as the websocket feeds (:meth:`~PollingFeed.start`,
:meth:`~PollingFeed.stop`, :meth:`~PollingFeed.health` returning a
:class:`~flows.feeds.health.FeedHealth`, ``failure``, :meth:`~PollingFeed.is_alive`).
"""
from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from flows.feeds.health import FeedHealth, HealthTracker
from flows.schema import Quarantine, TradeBatch

__all__ = ["BACKOFF", "FAILED", "LIVE", "STALE", "STARTING", "HttpPoller", "PollingFeed",
           "Response", "tornado_fetch"]

log = logging.getLogger(__name__)

STARTING, LIVE, BACKOFF, STALE, FAILED = "STARTING", "LIVE", "BACKOFF", "STALE", "FAILED"

Parse = Callable[[bytes, int], "tuple[TradeBatch, Quarantine, dict[str, Any]]"]


@dataclass(frozen=True)
class Response:
    """What a fetch returns: status code, headers (lower-cased names) and body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


Fetch = Callable[[str, float, Mapping[str, str]], Response]


def tornado_fetch(url: str, timeout_s: float, headers: Mapping[str, str]) -> Response:
    """Fetch ``url`` with tornado's blocking client; raise TimeoutError/ConnectionError on
    failures without an HTTP response. Works from any thread: where an event loop is already
    running (a notebook, a server thread), the fetch runs in a short-lived worker thread."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _blocking_fetch(url, timeout_s, headers)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_blocking_fetch, url, timeout_s, headers).result()


def _blocking_fetch(url: str, timeout_s: float, headers: Mapping[str, str]) -> Response:
    from tornado.httpclient import HTTPClient, HTTPClientError

    client = HTTPClient()
    try:
        resp = client.fetch(url, raise_error=False, request_timeout=timeout_s,
                            connect_timeout=timeout_s, headers=dict(headers),
                            follow_redirects=True, decompress_response=True)
    except HTTPClientError as exc:  # only code 599 is raised with raise_error=False
        raise (TimeoutError if "timeout" in str(exc).lower() else ConnectionError)(str(exc))
    finally:
        client.close()
    if resp.code == 599:
        err = resp.error or "no response"
        raise (TimeoutError if "timeout" in str(err).lower() else ConnectionError)(str(err))
    return Response(resp.code, {k.lower(): v for k, v in resp.headers.get_all()},
                    resp.body or b"")


class HttpPoller:
    """Fetch ``url`` every ``interval_s`` and parse each body; back off and recover on errors.

    Parameters
    ----------
    url : the endpoint.
    parse : ``parse(body, recv_ns) -> (TradeBatch, Quarantine, info)``, e.g.
        :meth:`flows.feeds.psx.PsxBoard.parse`.
    interval_s : seconds between the starts of successive polls.
    clock : monotonic seconds (scheduling).
    sleep : wait this many seconds; the default waits on the stop event, so :meth:`stop`
        interrupts it.
    fetch : ``fetch(url, timeout_s, headers) -> Response``; raises TimeoutError or OSError
        when there is no response. Default: :func:`tornado_fetch`.
    wall_ns : UTC ns, the ``recv_ns`` handed to ``parse``.
    timeout_s : request timeout.
    backoff_base_s, backoff_cap_s : full-jitter backoff: the n-th consecutive failure waits
        ``uniform(0, min(cap, base * 2**(n - 1)))`` seconds.
    stale_after_s : with no good poll for this long the state reads ``STALE``
        (default three intervals).
    max_failures : consecutive failures after which the poller gives up (``FAILED``);
        None retries forever.
    headers : extra request headers (a User-Agent is set by default).
    rng : random source of the jitter.

    Attributes
    ----------
    health : dict shared with the websocket feeds -- ``state`` (STARTING, LIVE, BACKOFF, STALE,
        FAILED), ``last_error``, ``polls`` (requests made), ``errors`` (failed requests),
        ``rate_limited`` (429s), ``consecutive_errors``, ``last_ok`` (clock s of the last
        good poll), ``next_delay_s`` and ``backoff_bound_s`` (the current jitter ceiling, or
        the wait ``Retry-After`` asked for after a 429).

    Examples
    --------
    >>> fake = {"t": 0.0}
    >>> replies = iter([Response(500), Response(200, body=b"board")])
    >>> poller = HttpPoller("http://127.0.0.1:1/board", lambda body, ns: (body, ns),
    ...                     interval_s=5, clock=lambda: fake["t"],
    ...                     sleep=lambda s: fake.update(t=fake["t"] + s),
    ...                     fetch=lambda url, timeout, headers: next(replies),
    ...                     wall_ns=lambda: 7, rng=random.Random(0))
    >>> poller.poll_once(), poller.health["state"], poller.health["errors"]
    (None, 'BACKOFF', 1)
    >>> poller.poll_once(), poller.health["state"]
    ((b'board', 7), 'LIVE')
    """

    def __init__(
        self,
        url: str,
        parse: Parse,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
        fetch: Fetch | None = None,
        *,
        wall_ns: Callable[[], int] = time.time_ns,
        timeout_s: float = 10.0,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        stale_after_s: float | None = None,
        max_failures: int | None = None,
        headers: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if not 0 < backoff_base_s <= backoff_cap_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_cap_s")
        self.url, self.parse, self.interval_s = url, parse, float(interval_s)
        self._stop = threading.Event()
        self.clock = clock
        self.sleep = sleep if sleep is not None else self._stop.wait
        self.fetch = fetch if fetch is not None else tornado_fetch
        self.wall_ns = wall_ns
        self.timeout_s = timeout_s
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.stale_after_s = 3 * self.interval_s if stale_after_s is None else stale_after_s
        self.max_failures = max_failures
        self.headers = {"User-Agent": "tapeflow-poller/0.1", **(headers or {})}
        self.rng = rng or random.Random()
        self._health: dict[str, Any] = {
            "state": STARTING, "last_error": None, "polls": 0, "errors": 0, "rate_limited": 0,
            "consecutive_errors": 0, "last_ok": None, "next_delay_s": 0.0,
            "backoff_bound_s": 0.0}
        self._next_delay = 0.0

    @property
    def health(self) -> dict[str, Any]:
        """A copy of the health figures; ``state`` reads STALE when good polls stopped."""
        h = dict(self._health)
        if h["state"] == LIVE and h["last_ok"] is not None and \
                self.clock() - h["last_ok"] > self.stale_after_s:
            h["state"] = STALE
        return h

    @property
    def failed(self) -> bool:
        return self._health["state"] == FAILED

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current poll (also ends a default sleep)."""
        self._stop.set()

    def poll_once(self) -> Any:
        """Fetch and parse once; return what ``parse`` returned, or None after a failure.

        Sets ``health["next_delay_s"]``: how long to wait before the next poll.
        """
        h = self._health
        started = self.clock()
        h["polls"] += 1
        try:
            resp = self.fetch(self.url, self.timeout_s, self.headers)
        except (TimeoutError, OSError) as exc:  # ConnectionError is an OSError
            kind = "timeout" if isinstance(exc, TimeoutError) else "connection error"
            return self._fail(f"{kind}: {exc}" if str(exc) else kind)
        if resp.status == 429:
            h["rate_limited"] += 1
            wait = max(self._retry_after(resp.headers), self.interval_s)
            return self._fail(f"HTTP 429 rate limited; retry after {wait:g} s", wait=wait)
        if resp.status >= 500:
            return self._fail(f"HTTP {resp.status}")
        if resp.status != 200:
            return self._fail(f"HTTP {resp.status} from {self.url}", fatal=True)
        result = self.parse(resp.body, self.wall_ns())
        h.update(state=LIVE, consecutive_errors=0, last_ok=self.clock(), backoff_bound_s=0.0)
        # Keep the cadence: the next poll starts one interval after this one started.
        self._set_delay(max(0.0, started + self.interval_s - self.clock()))
        return result

    def run(self, emit: Callable[[Any], Any], max_polls: int | None = None,
            on_poll: Callable[[dict[str, Any]], Any] | None = None) -> None:
        """Poll until :meth:`stop`, ``FAILED`` or ``max_polls``; ``emit`` each parse result.

        ``on_poll(health)`` is called after every poll, good or failed, before ``emit``.
        """
        polls = 0
        while not self._stop.is_set() and not self.failed:
            result = self.poll_once()
            polls += 1
            if on_poll is not None:
                on_poll(self.health)
            if result is not None:
                emit(result)
            if self.failed or (max_polls is not None and polls >= max_polls):
                break
            if self._next_delay > 0:
                self.sleep(self._next_delay)

    def _set_delay(self, delay: float) -> None:
        self._next_delay = delay
        self._health["next_delay_s"] = delay

    def _fail(self, message: str, wait: float | None = None, fatal: bool = False) -> None:
        h = self._health
        h["errors"] += 1
        h["consecutive_errors"] += 1
        h["last_error"] = message
        n = h["consecutive_errors"]
        if fatal or (self.max_failures is not None and n >= self.max_failures):
            h["state"] = FAILED
            self._set_delay(0.0)
            return
        h["state"] = BACKOFF
        if wait is None:
            bound = min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** min(n - 1, 60))
            h["backoff_bound_s"] = bound
            wait = self.rng.uniform(0.0, bound)
        else:
            h["backoff_bound_s"] = wait
        self._set_delay(wait)

    def _retry_after(self, headers: Mapping[str, str]) -> float:
        value = str(headers.get("retry-after", "")).strip()
        if not value:
            return 0.0
        try:
            seconds = float(value)
            return seconds if 0.0 <= seconds < 86400.0 * 7 else 0.0
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value)
            now = parsedate_to_datetime(headers["date"]) if "date" in headers else None
        except (TypeError, ValueError, IndexError):
            return 0.0
        now_s = now.timestamp() if now is not None else self.wall_ns() / 1e9
        return max(0.0, when.timestamp() - now_s)


class PollingFeed:
    """Poll ``url`` in a thread, parse each body and push the result into ``sink``.

    The polling twin of :class:`~flows.feeds.connection.WebsocketFeed`: same states
    (``CONNECTING`` until the first good poll, ``LIVE``, ``STALE`` when good polls stopped,
    ``BACKOFF`` after a failed one, ``FAILED`` with a reason, ``STOPPED``) and the same
    :class:`~flows.feeds.health.FeedHealth`: ``frames`` are good polls, ``reconnects``
    recoveries after failed polls, ``events["rate_limited"]`` the 429s. A failed poll is never
    pushed; a parser that raises has the body quarantined (``malformed``) and the feed goes on.

    Parameters
    ----------
    url : the endpoint.
    parse : ``parse(body, recv_ns) -> (TradeBatch, Quarantine, info)``; an ``info["error"]``
        is kept as the health's last error.
    sink : ``sink(batch, unparsed)``, called from the feed's thread, e.g. ``flow.push``.
    interval_s : seconds between the starts of successive polls.
    name : feed name in health reports.
    on_state : called with each new state (e.g. to set ``flow.feed_state``).
    clock : monotonic seconds.
    max_failures : consecutive failed polls after which the feed gives up (``FAILED``); None
        retries forever. A ``4xx`` other than 429 fails at once.
    **poller : further :class:`HttpPoller` options (``fetch``, ``wall_ns``, ``timeout_s``,
        ``backoff_base_s``, ``backoff_cap_s``, ``headers``, ``rng``, ...).

    Examples
    --------
    >>> from flows.schema import SymbolTable
    >>> replies = iter([Response(200, body=b"7"), Response(200, body=b"oops"), Response(404)])
    >>> def parse(body, recv_ns):
    ...     size = float(body)  # raises on b"oops": quarantined, the feed goes on
    ...     return TradeBatch.from_columns(SymbolTable(), time=[recv_ns], symbol=["X"],
    ...                                    price=[1.0], size=[size]), Quarantine(), {}
    >>> got = []
    >>> feed = PollingFeed("http://127.0.0.1:1/", parse, lambda b, q: got.append((len(b), len(q))),
    ...                    fetch=lambda url, timeout, headers: next(replies), interval_s=0.01)
    >>> feed.start().join(5)
    >>> got, feed.failure, feed.health().quarantined
    ([(1, 0), (0, 1)], 'HTTP 404 from http://127.0.0.1:1/', 1)
    """

    name = "poller"

    def __init__(self, url: str, parse: Callable[[bytes, int], tuple], sink, *,
                 interval_s: float = 5.0, name: str | None = None,
                 on_state: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_failures: int | None = 10,
                 **poller):
        self.name = name or self.name
        self.sink = sink
        self.parse_body = parse
        self.tracker = HealthTracker(self.name, clock=clock, on_state=on_state)
        self.poller = HttpPoller(url, self._parse, interval_s, clock=clock,
                                 max_failures=max_failures, **poller)
        self._down = True
        self._rate_limited = 0
        self._thread: threading.Thread | None = None
        #: the reason the feed FAILED, or None.
        self.failure: str | None = None

    def start(self) -> PollingFeed:
        """Start polling in a daemon thread; return self."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-poll", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the poll in flight (a wait between polls ends at once); join the thread."""
        self.poller.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the feed ends (stopped or FAILED)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> FeedHealth:
        if self.tracker.state == "LIVE" and self.poller.health["state"] == STALE:
            self.tracker.set_state("STALE", f"no good poll for {self.poller.stale_after_s:g} s")
        return self.tracker.snapshot()

    def wait_for_state(self, states: str | Iterable[str], timeout: float = 10.0) -> bool:
        """Wait until the feed is in one of ``states``; False on timeout."""
        return self.tracker.wait_for_state(states, timeout)

    # -- the polling thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.poller.run(self._emit, on_poll=self._polled)
        except Exception as exc:  # a bug in here must not leave the feed silently dead
            log.exception("%s: poll loop crashed", self.name)
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
            return
        if self.poller.failed:
            self._fail(self.poller.health["last_error"] or "failed")
        else:
            self.tracker.set_state("STOPPED")

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.tracker.set_state("FAILED", reason)
        log.error("%s: FAILED: %s", self.name, reason)

    def _parse(self, body: bytes, recv_ns: int) -> tuple[TradeBatch, Quarantine, dict]:
        self.tracker.frame()
        try:
            trades, unparsed, info = self.parse_body(body, recv_ns)
        except Exception as exc:  # a parser bug must not kill the feed: quarantine the body
            log.exception("%s: parse failed", self.name)
            trades, info = TradeBatch(), {}
            unparsed = Quarantine.malformed([body.decode("utf-8", "replace")])
            self.tracker.error(f"parse failed: {type(exc).__name__}: {exc}")
        self.tracker.observe(trades, recv_ns)
        if len(unparsed):
            self.tracker.quarantined(len(unparsed))
        if info.get("error"):
            self.tracker.error(str(info["error"]))
        return trades, unparsed, info

    def _polled(self, h: dict[str, Any]) -> None:
        if h["rate_limited"] > self._rate_limited:
            self._rate_limited = h["rate_limited"]
            self.tracker.event("rate_limited", wait_s=h["next_delay_s"])
        if h["state"] in (LIVE, STALE):
            if self._down:
                self.tracker.connected()
                self._down = False
            self.tracker.set_state("LIVE")
        elif h["state"] == BACKOFF:
            self._down = True
            self.tracker.backoff(h["next_delay_s"], h["backoff_bound_s"])
            self.tracker.set_state("BACKOFF", h["last_error"])

    def _emit(self, result: tuple[TradeBatch, Quarantine, dict]) -> None:
        trades, unparsed, _ = result
        if not (len(trades) or len(unparsed)):
            return
        try:
            self.sink(trades, unparsed)
        except Exception as exc:  # the feed survives a failing sink; the loss is counted
            log.exception("%s: sink failed", self.name)
            self.tracker.dropped(1, len(trades) + len(unparsed))
            self.tracker.error(f"sink failed: {type(exc).__name__}: {exc}")
