"""Polygon-style stocks websocket: ``T`` trades, ``AM`` minute aggregates and status messages.

The protocol: after connecting the server sends ``[{"ev":"status","status":"connected",...}]``;
the client sends :func:`auth_message` and, once ``auth_success`` arrives,
:func:`subscribe_message`. Every frame is a JSON array of events of mixed kinds.
:class:`PolygonParser` is pure -- no I/O -- so the shared websocket layer calls it per frame.

``T`` events become trades. Their ``i`` (trade id) is unique per symbol *and exchange* only, so
it cannot serve as our per-symbol ``trade_id``; ``q`` (the per-symbol sequence number, unique and
increasing) does, and is used when present -- otherwise ``trade_id`` is ``NO_ID`` and the
trade is never taken for a duplicate. ``c`` (sale conditions) and ``x`` (exchange) are not used.

``AM`` events become a :class:`~flows.schema.BarBatch` of 1m bars in ``info["bars"]``
(feed them with ``Flow.push_bars("1m", ...)``): ``s`` is the bar's open time. Polygon gives no
trade count (``z`` is the *average* trade size), so ``trades`` is 0, "unknown".

:class:`PolygonFeed` speaks the protocol on a :class:`~flows.feeds.connection.WebsocketFeed`:
auth on every connect, the current subscriptions once ``auth_success`` arrives, and
``auth_failed`` ends the feed in ``FAILED`` with Polygon's message -- one attempt, no retries.
A minute bar (``AM``) and our own trades (``T``) of the same symbol and minute would count
that minute's volume twice, so an ``AM`` bar reaches the flow only for a (symbol, minute) in
which the feed saw no trade (a symbol subscribed to bars only, or a minute missed while
reconnecting); the others are counted in the health's ``ignored`` as ``AM_minute_had_trades``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from flows.feeds import FeedError
from flows.feeds.connection import ConnectionConfig, Sink, WebsocketFeed
from flows.schema import NO_ID, NS, BarBatch, Quarantine, SymbolTable, TradeBatch

__all__ = ["DEFAULT_URL", "FATAL_STATUSES", "KEY_ENV", "PolygonFeed", "PolygonParser",
           "auth_message", "channel_names", "start_polygon", "subscribe_message"]

log = logging.getLogger(__name__)

#: Polygon's real-time stocks cluster.
DEFAULT_URL = "wss://socket.polygon.io/stocks"
#: The environment variable :func:`start_polygon` reads the API key from.
KEY_ENV = "POLYGON_API_KEY"
#: Statuses that are part of a normal session (anything else is kept as the last error).
OK_STATUSES = frozenset({"connected", "auth_success", "success"})
_CHANNEL = re.compile(r"(T|AM)\.(\*|[A-Z][A-Z0-9.:/-]{0,19})")
_MINUTE = 60 * NS

_MS = 1_000_000
_MAX_MS = (2**63 - 1) // _MS
#: Statuses after which reconnecting with the same key cannot succeed.
FATAL_STATUSES = frozenset({"auth_failed"})


def auth_message(key: str) -> dict[str, str]:
    """Return the authentication message (send it as JSON once connected).

    Examples
    --------
    >>> auth_message("KEY")
    {'action': 'auth', 'params': 'KEY'}
    """
    if not isinstance(key, str) or not key.strip():
        raise ValueError("an API key is required for Polygon (set it with --api-key or the env)")
    return {"action": "auth", "params": key.strip()}


def subscribe_message(channels: Sequence[str] = ("T.*", "AM.*")) -> dict[str, str]:
    """Return the subscribe message for ``channels`` (``T.AAPL``, ``AM.*``, ...).

    Examples
    --------
    >>> subscribe_message()
    {'action': 'subscribe', 'params': 'T.*,AM.*'}
    """
    if isinstance(channels, str):
        channels = [c for c in channels.split(",")]
    channels = [c.strip() for c in channels if c.strip()]
    if not channels:
        raise ValueError("subscribe to at least one channel such as 'T.*'")
    return {"action": "subscribe", "params": ",".join(channels)}


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _ms_to_ns(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected epoch ms, got {type(value).__name__}")
    if not -_MAX_MS < value < _MAX_MS:  # also rejects NaN
        raise ValueError(f"epoch ms {value} out of range")
    return int(value) * _MS if isinstance(value, int) else round(value * _MS)


def _symbol(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("sym must be non-empty text")
    return value.strip()


def _raw(event: Any) -> str:
    if isinstance(event, (bytes, bytearray)):
        return bytes(event).decode("utf-8", "replace")
    if isinstance(event, str):
        return event
    try:
        return json.dumps(event, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(event)[:500]


class PolygonParser:
    """Turn Polygon-style frames into trades (``T``), 1m bars (``AM``) and status info.

    Parameters
    ----------
    symbols : the flow's symbol table.

    :meth:`parse` returns ``(trades, quarantine, info)``; ``info`` may hold

    - ``bars``: a :class:`BarBatch` of the frame's ``AM`` events (1m bars);
    - ``status``: the status events, ``[{"status": ..., "message": ...}]``, in order;
    - ``authenticated``: True after ``auth_success`` (send the subscription then);
    - ``fatal``: a message when a status means retrying cannot help (``auth_failed``);
    - ``ignored``: events of other kinds, by ``ev``.

    Examples
    --------
    A frame in the documented format (``T`` and ``AM`` field lists of Polygon's stocks
    websocket reference)::

        [{"ev":"T","sym":"MSFT","x":4,"i":"12345","z":3,"p":114.125,"s":100,"c":[0,12],
          "t":1536036818784,"q":3681328},
         {"ev":"AM","sym":"GTE","v":4110,"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,
          "c":0.4486,"h":0.4489,"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,
          "e":1610144700000}]

    >>> p = PolygonParser(SymbolTable())
    >>> frame = ('[{"ev":"T","sym":"MSFT","x":4,"i":"12345","z":3,"p":114.125,"s":100,'
    ...          '"c":[0,12],"t":1536036818784,"q":3681328},{"ev":"AM","sym":"GTE","v":4110,'
    ...          '"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,"c":0.4486,"h":0.4489,'
    ...          '"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,"e":1610144700000}]')
    >>> trades, bad, info = p.parse(frame, recv_ns=0)
    >>> trades.time.tolist(), trades.trade_id.tolist(), info["bars"].close.tolist(), len(bad)
    ([1536036818784000000], [3681328], [0.4486], 0)
    >>> p.parse('[{"ev":"status","status":"auth_failed","message":"authentication failed"}]',
    ...         recv_ns=0)[2]["fatal"]
    'auth_failed: authentication failed'
    """

    def __init__(self, symbols: SymbolTable):
        self.symbols = symbols
        self.authenticated = False

    def parse(self, frame: list | dict | str | bytes, recv_ns: int
              ) -> tuple[TradeBatch, Quarantine, dict[str, Any]]:
        """Parse one frame (an array of events, or a single event) received at ``recv_ns``."""
        info: dict[str, Any] = {}
        trades: list[tuple] = []
        bars: list[tuple] = []
        bad: list[tuple[str, str]] = []
        try:
            if isinstance(frame, (bytes, bytearray, memoryview)):
                frame = bytes(frame).decode("utf-8")
            events = json.loads(frame) if isinstance(frame, str) else frame
        except (UnicodeDecodeError, ValueError, RecursionError):
            events = []
            bad.append((_raw(frame), "malformed"))
        if not isinstance(events, list):
            events = [events]
        for ev in events:
            self._event(ev, trades, bars, bad, info)
        if trades:
            cols = list(zip(*trades))
            batch = TradeBatch.from_columns(self.symbols, symbol=cols[0], time=cols[1],
                                            price=cols[2], size=cols[3], trade_id=cols[4],
                                            recv_time=recv_ns)
        else:
            batch = TradeBatch()
        if bars:
            cols = list(zip(*bars))
            info["bars"] = BarBatch.from_columns(self.symbols, symbol=cols[0], time=cols[1],
                                                 open=cols[2], high=cols[3], low=cols[4],
                                                 close=cols[5], volume=cols[6], vwap=cols[7])
        quarantine = Quarantine.concat([Quarantine.malformed([r], why) for r, why in bad])
        return batch, quarantine, info

    __call__ = parse

    def _event(self, ev: Any, trades: list, bars: list, bad: list, info: dict) -> None:
        if not isinstance(ev, dict) or not isinstance(ev.get("ev"), str):
            bad.append((_raw(ev), "malformed"))
            return
        kind = ev["ev"]
        try:
            if kind == "T":
                q = ev.get("q")
                trade_id = q if isinstance(q, int) and not isinstance(q, bool) and \
                    0 <= q < 2**62 else NO_ID
                trades.append((_symbol(ev["sym"]), _ms_to_ns(ev["t"]), _number(ev["p"]),
                               _number(ev["s"]), trade_id))
            elif kind == "AM":
                vw = ev.get("vw")
                bars.append((_symbol(ev["sym"]), _ms_to_ns(ev["s"]), _number(ev["o"]),
                             _number(ev["h"]), _number(ev["l"]), _number(ev["c"]),
                             _number(ev["v"]), float("nan") if vw is None else _number(vw)))
            elif kind == "status":
                self._status(ev, info)
            else:
                ignored = info.setdefault("ignored", {})
                ignored[kind] = ignored.get(kind, 0) + 1
        except KeyError:
            bad.append((_raw(ev), "missing_field"))
        except (TypeError, ValueError, OverflowError):
            bad.append((_raw(ev), "malformed"))

    def _status(self, ev: dict, info: dict) -> None:
        status, message = str(ev.get("status", "")), str(ev.get("message", ""))
        info.setdefault("status", []).append({"status": status, "message": message})
        if status == "auth_success":
            self.authenticated = info["authenticated"] = True
        elif status in FATAL_STATUSES:
            self.authenticated = info["authenticated"] = False
            info["fatal"] = f"{status}: {message}" if message else status


# --------------------------------------------------------------------------- the live feed

def channel_names(symbols: str | Iterable[str], bars: bool = False) -> list[str]:
    """Channels for ``symbols``: ``T.<SYM>`` each (``T.*`` for ``["*"]``), then ``AM.*`` likewise.

    Examples
    --------
    >>> channel_names(["aapl", "MSFT"], bars=True)
    ['T.AAPL', 'T.MSFT', 'AM.AAPL', 'AM.MSFT']
    >>> channel_names(["*"]), channel_names("*", bars=True)
    (['T.*'], ['T.*', 'AM.*'])
    """
    if isinstance(symbols, str):
        symbols = symbols.split(",")
    syms = list(dict.fromkeys(str(s).strip().upper() for s in symbols))
    if not syms or syms == [""]:
        raise FeedError("polygon: no symbols to subscribe (give tickers, or * for all)")
    if "*" in syms and len(syms) > 1:
        raise FeedError("polygon: give either * (every ticker) or a list of tickers, not both")
    out = [f"T.{s}" for s in syms] + ([f"AM.{s}" for s in syms] if bars else [])
    _check_channels(out)
    return out


def _check_channels(channels: Sequence[str]) -> None:
    for c in channels:
        if not _CHANNEL.fullmatch(c):
            raise FeedError(f"polygon: bad channel {c!r} (expected T.<TICKER>, AM.<TICKER> or T.*)")


BarSink = Callable[[str, BarBatch], None]


class PolygonFeed(WebsocketFeed):
    """Polygon stocks ``T`` trades (and ``AM`` minute bars) into a flow, authenticated.

    Parameters
    ----------
    table : the flow's symbol table.
    channels : ``T.AAPL``, ``AM.*``, ... (:func:`channel_names` builds them).
    sink : ``sink(batch, unparsed)`` for trades and unparsable events, e.g. ``flow.push``.
    key : the API key, sent in the auth message (never logged).
    url : the endpoint; default :data:`DEFAULT_URL`.
    bar_sink : ``bar_sink("1m", bars)`` for ``AM`` bars, e.g. ``flow.push_bars``; required
        when an ``AM`` channel is subscribed. Called from the consumer thread, once the trades
        that arrived before the bars have been pushed.
    **kwargs : :class:`~flows.feeds.connection.WebsocketFeed` options (config, clock, rng, ...).
        The default config waits 120 s for a frame before reconnecting: a handful of tickers
        can be quiet for a minute, and Polygon sends no heartbeat.

    ``q`` (the trade id) increases per symbol but skips numbers, so the feed infers no id
    gaps from it (``contiguous_ids`` is False); duplicates are still dropped by the flow.

    Examples
    --------
    >>> feed = PolygonFeed(SymbolTable(), ["T.AAPL"], sink=lambda b, q: None, key="KEY")
    >>> feed.subscribe_messages(feed.subscriptions, on_connect=True)
    ['{"action": "auth", "params": "KEY"}']
    >>> b, q = feed.parse('[{"ev":"T","sym":"AAPL","p":226.87,"s":1,"t":1536036818790,"q":7},'
    ...                   '{"ev":"status","status":"success","message":"subscribed to: T.AAPL"}]', 0)
    >>> b.price.tolist(), b.trade_id.tolist(), len(q), feed.health().ignored
    ([226.87], [7], 0, {'status': 1})
    """

    name = "polygon"
    contiguous_ids = False

    def __init__(self, table: SymbolTable, channels: Sequence[str], sink: Sink, *, key: str,
                 url: str | None = None, bar_sink: BarSink | None = None, **kwargs):
        try:
            self._auth = json.dumps(auth_message(key))
        except ValueError:
            raise FeedError(f"polygon: no API key; pass one or set {KEY_ENV}") from None
        channels = list(dict.fromkeys(channels))
        if not channels:
            raise FeedError("polygon: no channels to subscribe")
        if bar_sink is None and any(c.startswith("AM.") for c in channels):
            raise FeedError("polygon: AM channels need a bar_sink (e.g. flow.push_bars)")
        if kwargs.get("config") is None:
            kwargs["config"] = ConnectionConfig(idle_s=120.0)
        super().__init__(sink, channels, **kwargs)
        self.table, self.bar_sink = table, bar_sink
        self.endpoint = url or DEFAULT_URL
        self.parser = PolygonParser(table)
        self._bars_lock = threading.Lock()
        self._bars: list[BarBatch] = []
        # Minutes (ns // 60 s) in which the feed saw a trade, per symbol code: the last few.
        self._traded: dict[int, deque] = {}
        #: AM bars received, handed to ``bar_sink``, and left out (their minute had trades).
        self.bars_received = self.bars_pushed = self.bars_covered = 0

    # -- WebsocketFeed hooks ------------------------------------------------------------------

    def url(self, subscriptions: Sequence[str]) -> str:
        return self.endpoint

    def subscribe_messages(self, streams: Sequence[str], on_connect: bool) -> list[str]:
        if on_connect:  # authenticate first; the subscription follows auth_success (parse)
            self.parser.authenticated = False
            return [self._auth]
        if self.parser.authenticated and streams:
            return [json.dumps(subscribe_message(streams))]
        return []

    def unsubscribe_messages(self, streams: Sequence[str]) -> list[str]:
        if not self.parser.authenticated:
            return []
        return [json.dumps({"action": "unsubscribe", "params": ",".join(streams)})]

    def check_subscriptions(self, streams: Sequence[str]) -> None:
        _check_channels(streams)

    def parse(self, message: str | bytes, recv_ns: int) -> tuple[TradeBatch, Quarantine]:
        """One frame of events -> (trades, quarantine records); never raises for bad input."""
        trades, bad, info = self.parser.parse(message, recv_ns)
        for st in info.get("status", []):
            self.tracker.ignored("status")
            if st["status"] not in OK_STATUSES:
                self.tracker.error(f"polygon: {st['status']}: {st['message']}")
        for kind, n in info.get("ignored", {}).items():
            for _ in range(n):
                self.tracker.ignored(kind)
        if "fatal" in info:
            self.give_up(f"polygon: {info['fatal']}")
        elif info.get("authenticated") and self.subscriptions:
            self._send_later([json.dumps(subscribe_message(self.subscriptions))])
        if len(trades):
            self._note_minutes(trades)
        if "bars" in info:
            self._keep_bars(info["bars"])
        return trades, bad

    def after_sink(self) -> None:
        with self._bars_lock:
            pending, self._bars = self._bars, []
        for bars in pending:
            try:
                self.bar_sink("1m", bars)
                self.bars_pushed += len(bars)
            except Exception as exc:  # like a failing trade sink: counted, the feed carries on
                log.exception("%s: bar sink failed", self.name)
                self.tracker.dropped(0, len(bars))
                self.tracker.error(f"bar sink failed: {type(exc).__name__}: {exc}")

    # -- minute bars ----------------------------------------------------------------------------

    def _note_minutes(self, trades: TradeBatch) -> None:
        for code, minute in set(zip(trades.symbol.tolist(), (trades.time // _MINUTE).tolist())):
            seen = self._traded.setdefault(code, deque(maxlen=16))
            if minute not in seen:
                seen.append(minute)

    def _keep_bars(self, bars: BarBatch) -> None:
        self.bars_received += len(bars)
        covered = np.array([m in self._traded.get(c, ()) for c, m in
                            zip(bars.symbol.tolist(), (bars.time // _MINUTE).tolist())], dtype=bool)
        for _ in range(int(covered.sum())):
            self.tracker.ignored("AM_minute_had_trades")
        self.bars_covered += int(covered.sum())
        if not covered.all():
            with self._bars_lock:
                self._bars.append(bars.take(~covered))
            self.wake_consumer = True


def start_polygon(flow, symbols: str | Sequence[str], *, url: str | None = None,
                  key: str | None = None, bars: bool = False,
                  config: ConnectionConfig | None = None, **kwargs) -> PolygonFeed:
    """Run Polygon trades (``T``; with ``bars`` also ``AM`` minute bars) into ``flow``.

    ``symbols`` are tickers, or ``["*"]`` for every one. The key is ``key`` or the
    :data:`KEY_ENV` environment variable; without one a :class:`~flows.feeds.FeedError` is
    raised before anything starts. The feed's state drives ``flow.feed_state``, its health
    is registered with ``flow.register_feed``, trades are pushed as feed ``polygon`` and
    ``AM`` bars through ``flow.push_bars("1m", ...)``; the flow's flusher persists.
    """
    key = key or os.environ.get(KEY_ENV, "")
    if not key.strip():
        raise FeedError(f"polygon: no API key; pass one or set {KEY_ENV}")
    channels = channel_names(symbols, bars=bars)
    if config is not None:
        kwargs["config"] = config
    name = kwargs.setdefault("name", PolygonFeed.name)

    def on_state(state: str) -> None:
        flow.feed_state = state

    def sink(batch: TradeBatch, unparsed: Quarantine) -> None:
        flow.push(batch, unparsed, feed=name)

    feed = PolygonFeed(flow.table, channels, sink, key=key, url=url,
                       bar_sink=flow.push_bars if bars else None, on_state=on_state, **kwargs)
    flow.register_feed(name, feed.health)
    flow.start_flusher()
    return feed.start()
