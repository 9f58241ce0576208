"""Binance combined-stream websocket: ``@aggTrade`` / ``@trade`` as TradeBatch, ``@kline_1m`` kept.

The wire parsers here (:func:`parse_agg_trade`, :func:`parse_trade`, :func:`parse_kline`) are the
only Binance parsers in tapeflow: :mod:`flows.feeds.replay` reads recorded captures with them.

:class:`BinanceFeed` opens ``<endpoint>/stream?streams=btcusdt@aggTrade/ethusdt@aggTrade/...``
(spot ``wss://stream.binance.com:9443``, USDT-M futures ``wss://fstream.binance.com``, or any
URL -- the tests use a loopback server) on a :class:`~flows.feeds.connection.WebsocketFeed`,
which reconnects, resubscribes, answers server pings and detects stale connections. Each frame
becomes one TradeBatch row (an aggTrade counts ``l - f + 1`` exchange trades in
``TradeBatch.count``, as Binance's klines do). Frames that cannot be parsed -- not JSON, wrong
types, missing fields, numbers that do not fit -- become quarantine records with the raw
payload and reason ``malformed`` or ``missing_field``; the stream continues. NaN or infinite
prices and sizes parse and are quarantined by the flow's validator with their value reasons.
Frames of other streams (depth, bookTicker, subscription acks) are counted in the feed's
health as ``ignored``.

Closed ``@kline_1m`` candles are cross-checked against our 1m bars (see
:meth:`BinanceFeed.crosscheck`): a minute we saw whole, gap-free, whose bar differs from
Binance's candle is recorded as a ``kline_divergence`` quality event.
"""
from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from flows.feeds import FeedError
from flows.feeds.connection import ConnectionConfig, Sink, WebsocketFeed
from flows.schema import BUY, NS, SELL, Quarantine, SymbolTable, TradeBatch

try:
    import orjson as _orjson
except ImportError:  # optional: json does the same, slower
    _orjson = None

__all__ = ["ENDPOINTS", "BinanceFeed", "parse_agg_trade", "parse_kline", "parse_trade",
           "start_binance", "stream_names"]

#: Combined-stream endpoints by market kind.
ENDPOINTS = {"spot": "wss://stream.binance.com:9443", "usdm": "wss://fstream.binance.com"}
#: Trade channels a symbol can be subscribed to (one per symbol: their ids are different series).
TRADE_CHANNELS = ("aggTrade", "trade")
_MAX_I64 = 2**63 - 1
_MAX_MS = _MAX_I64 // 1_000_000

#: Row layout of the parsers: the columns of an aggTrade/trade row.
AGG_COLUMNS = ("symbol", "time", "price", "size", "agg_id", "side", "recv_time", "first_id",
               "last_id")
KLINE_COLUMNS = ("symbol", "interval", "t", "open", "high", "low", "close", "volume", "trades",
                 "first_id", "last_id", "closed", "quote_volume", "taker_buy_volume",
                 "taker_buy_quote_volume", "event_time", "recv_ts")


# --------------------------------------------------------------------------- wire parsers

def _num(x) -> float:
    """A decimal string or JSON number as float (NaN/inf pass: the validator rejects them)."""
    if isinstance(x, bool) or not isinstance(x, (str, int, float)):
        raise TypeError(f"expected a number, got {type(x).__name__}")
    return float(x)


def _int(x, limit: int = _MAX_I64) -> int:
    """A JSON integer (or integral string) that fits in int64 (and under ``limit``)."""
    if isinstance(x, bool) or not isinstance(x, (str, int)):
        raise TypeError(f"expected an integer, got {type(x).__name__}")
    v = int(x)
    if not -limit <= v <= limit:
        raise OverflowError(f"{v} out of range")
    return v


def _str(x) -> str:
    if not isinstance(x, str) or not x:
        raise TypeError("expected a non-empty string")
    return x


def _bool(x) -> bool:
    if not isinstance(x, bool):
        raise TypeError("expected a boolean")
    return x


def stream_kind(frame: dict) -> str:
    """The stream kind of a frame: ``aggTrade``, ``kline_1m``, ``depth@100ms``, ...

    Examples
    --------
    >>> stream_kind({"stream": "btcusdt@kline_1m", "data": {}}), stream_kind({"e": "trade"})
    ('kline_1m', 'trade')
    """
    stream = frame.get("stream")
    if isinstance(stream, str):
        return stream.split("@", 1)[1] if "@" in stream else stream
    return str(frame.get("e", "other"))


def parse_agg_trade(data: dict, recv_ns: int) -> tuple:
    """Parse one aggTrade payload into a row (:data:`AGG_COLUMNS`); raise KeyError (missing
    field) or ValueError/TypeError/OverflowError (malformed) if broken.

    A real frame (binance_usdm_ws_combined_2021-04-17T1637Z.jsonl)::

        {"recv_ts":1618677448.8334389,"frame":{"stream":"yfiusdt@aggTrade","data":{
         "e":"aggTrade","E":1618677448238,"a":52599685,"s":"YFIUSDT","p":"49966.7",
         "q":"0.001","f":64902163,"l":64902163,"T":1618677448084,"m":false}}}

    ``T`` is the trade time (ms), ``a`` the aggregate id, ``f``..``l`` the raw trade ids it
    aggregates, and ``m`` true when the buyer was the maker, i.e. the seller was the aggressor.

    Examples
    --------
    >>> d = {"e": "aggTrade", "E": 1618677448238, "a": 52599685, "s": "YFIUSDT", "p": "49966.7",
    ...      "q": "0.001", "f": 64902163, "l": 64902165, "T": 1618677448084, "m": False}
    >>> parse_agg_trade(d, 7)
    ('YFIUSDT', 1618677448084000000, 49966.7, 0.001, 52599685, 1, 7, 64902163, 64902165)
    """
    first, last = _int(data["f"]), _int(data["l"])
    if last < first:
        raise ValueError("l < f")
    return (_str(data["s"]), _int(data["T"], _MAX_MS) * 1_000_000, _num(data["p"]),
            _num(data["q"]), _int(data["a"]), SELL if _bool(data["m"]) else BUY, int(recv_ns),
            first, last)


def parse_trade(data: dict, recv_ns: int) -> tuple:
    """Parse one raw trade payload into a row like :func:`parse_agg_trade` (``f = l = t``).

    The frame as documented by Binance (the captures in tests/data hold no ``@trade``)::

        {"stream":"bnbbtc@trade","data":{"e":"trade","E":1672515782136,"s":"BNBBTC",
         "t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}
    """
    tid = _int(data["t"])
    return (_str(data["s"]), _int(data["T"], _MAX_MS) * 1_000_000, _num(data["p"]),
            _num(data["q"]), tid, SELL if _bool(data["m"]) else BUY, int(recv_ns), tid, tid)


def parse_kline(data: dict, recv_ts: float) -> dict:
    """Parse one kline update (:data:`KLINE_COLUMNS`); raise KeyError/ValueError/TypeError if broken.

    A real frame (binance_spot_ws_combined_2021-08-14T1446Z.jsonl)::

        {"recv_ts":1628952398.4272902,"frame":{"stream":"sxpbtc@kline_1m","data":{"e":"kline",
         "E":1628952398392,"s":"SXPBTC","k":{"t":1628952360000,"T":1628952419999,"s":"SXPBTC",
         "i":"1m","f":17567400,"L":17567403,"o":"0.00007477","c":"0.00007480",
         "h":"0.00007480","l":"0.00007477","v":"303.00000000","n":4,"x":false,
         "q":"0.02266170","V":"303.00000000","Q":"0.02266170","B":"0"}}}

    ``n`` counts raw trades (the sum of ``l - f + 1`` over the minute's aggTrades).
    """
    k = data["k"]
    if not isinstance(k, dict):
        raise TypeError("k is not an object")
    return {"symbol": _str(k["s"]), "interval": _str(k["i"]), "t": _int(k["t"], _MAX_MS),
            "open": _num(k["o"]), "high": _num(k["h"]), "low": _num(k["l"]),
            "close": _num(k["c"]), "volume": _num(k["v"]), "trades": _int(k["n"]),
            "first_id": _int(k["f"]), "last_id": _int(k["L"]), "closed": _bool(k["x"]),
            "quote_volume": _num(k["q"]), "taker_buy_volume": _num(k["V"]),
            "taker_buy_quote_volume": _num(k["Q"]), "event_time": _int(data["E"], _MAX_MS),
            "recv_ts": recv_ts}


def rows_to_batch(rows: Sequence[tuple], symbols: SymbolTable) -> TradeBatch:
    """Turn parser rows into one TradeBatch (``count = l - f + 1``).

    Examples
    --------
    >>> row = ('YFIUSDT', 1618677448084000000, 49966.7, 0.001, 52599685, 1, 7, 64902163, 64902165)
    >>> table = SymbolTable()
    >>> one, two = rows_to_batch([row], table), rows_to_batch([row, row], table)
    >>> one.trade_id.tolist(), one.count.tolist(), one.count.dtype.name
    ([52599685], [3], 'int32')
    >>> all(np.array_equal(getattr(one, c), getattr(two, c)[:1]) and
    ...     getattr(one, c).dtype == getattr(two, c).dtype for c in TradeBatch.COLUMNS)
    True
    """
    if not rows:
        return TradeBatch()
    if len(rows) == 1:
        batch = _one_row(rows[0], symbols)
        if batch is not None:
            return batch
    cols = list(zip(*rows))
    count = np.asarray(cols[8], dtype=np.int64) - np.asarray(cols[7], dtype=np.int64) + 1
    return TradeBatch.from_columns(symbols, symbol=cols[0], time=cols[1], price=cols[2],
                                   size=cols[3], trade_id=cols[4], side=cols[5],
                                   recv_time=cols[6],
                                   count=np.clip(count, 1, np.iinfo(np.int32).max))


_MAX_COUNT = int(np.iinfo(np.int32).max)


def _one_row(row: tuple, symbols: SymbolTable) -> TradeBatch | None:
    """A parser row as a one-row TradeBatch, built directly: a live feed makes one per frame,
    and :meth:`TradeBatch.from_columns` costs several times more for a single row. None when
    ``count`` would need :func:`rows_to_batch`'s clipping (it then takes the general path)."""
    symbol, t, price, size, trade_id, side, recv, first, last = row
    count = last - first + 1
    if not 1 <= count <= _MAX_COUNT:
        return None
    return TradeBatch(time=np.array([t], np.int64), symbol=np.array([symbols.code(symbol)], np.int32),
                      price=np.array([price], np.float64), size=np.array([size], np.float64),
                      trade_id=np.array([trade_id], np.int64), side=np.array([side], np.int8),
                      recv_time=np.array([recv], np.int64), count=np.array([count], np.int32))


def _loads(message: str | bytes):
    """``json.loads``, by orjson when it is installed (about twice as fast on a frame).

    Whatever orjson refuses -- NaN literals, integers beyond 64 bits, lone surrogates -- is
    decoded by ``json.loads`` again, so the result (or the error) is always json's.
    """
    if _orjson is not None:
        try:
            return _orjson.loads(message)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(message)


# --------------------------------------------------------------------------- the live feed

def stream_names(symbols: Iterable[str], trades: str = "aggTrade", kline: bool = False) -> list[str]:
    """Stream names for ``symbols``: ``btcusdt@aggTrade`` (and ``btcusdt@kline_1m``).

    Examples
    --------
    >>> stream_names(["BTCUSDT", "ethusdt"], kline=True)
    ['btcusdt@aggTrade', 'btcusdt@kline_1m', 'ethusdt@aggTrade', 'ethusdt@kline_1m']
    """
    if trades not in TRADE_CHANNELS:
        raise FeedError(f"binance: unknown trade channel {trades!r}; choose from {', '.join(TRADE_CHANNELS)}")
    out = []
    for s in symbols:
        s = s.strip().lower()
        if not s or not s.isalnum():
            raise FeedError(f"binance: bad symbol {s!r} (expected e.g. btcusdt)")
        out += [f"{s}@{trades}"] + ([f"{s}@kline_1m"] if kline else [])
    return out


BarLookup = Callable[[str, int], "dict | None"]


class BinanceFeed(WebsocketFeed):
    """Binance combined streams into ``sink`` as TradeBatch, resilient to drops and bad frames.

    Parameters
    ----------
    table : the flow's symbol table (symbols are coded by their Binance name, ``BTCUSDT``).
    streams : stream names, e.g. ``["btcusdt@aggTrade", "btcusdt@kline_1m"]``
        (:func:`stream_names` builds them from symbols).
    sink : ``sink(batch, unparsed)``, e.g. ``flow.push``.
    url : the endpoint (``ws://host:port`` or ``.../stream``); default the ``kind``'s.
    kind : ``"spot"`` or ``"usdm"`` (USDT-M futures).
    bar_lookup : ``bar_lookup(symbol, minute_ns)`` -> our 1m bar as a dict with open, high, low,
        close, volume, trades (or None): enables the kline cross-check after every push
        (:func:`flow_bar_lookup` reads a Flow).
    **kwargs : :class:`~flows.feeds.connection.WebsocketFeed` options (config, clock, rng, ...).
    """

    def __init__(self, table: SymbolTable, streams: Sequence[str], sink: Sink, *,
                 url: str | None = None, kind: str = "spot", bar_lookup: BarLookup | None = None,
                 **kwargs):
        if kind not in ENDPOINTS:
            raise FeedError(f"binance: unknown kind {kind!r}; choose from {', '.join(ENDPOINTS)}")
        streams = list(dict.fromkeys(streams))
        if not streams:
            raise FeedError("binance: no streams to subscribe")
        kwargs.setdefault("name", f"binance-{kind}")
        if "config" not in kwargs:  # Binance drops every connection after 24 h: leave first
            kwargs["config"] = ConnectionConfig(max_session_s=23.5 * 3600)
        super().__init__(sink, streams, **kwargs)
        self.table, self.kind = table, kind
        self.endpoint = (url or ENDPOINTS[kind]).rstrip("/")
        self.bar_lookup = bar_lookup
        self._next_id = 1
        self._klines_lock = threading.Lock()
        self._latest_klines: dict[str, dict] = {}
        self._closed_klines: deque[dict] = deque(maxlen=10_000)
        # Raw trade-id coverage per symbol since the last gap: (first f, last l, recent l's).
        self._cover: dict[str, list] = {}
        #: closed klines compared with our bars, and those that could not be (minute not seen whole).
        self.klines_checked = 0
        self.klines_unverifiable = 0

    # -- WebsocketFeed hooks ------------------------------------------------------------------

    def url(self, subscriptions: Sequence[str]) -> str:
        base = self.endpoint if self.endpoint.endswith("/stream") else self.endpoint + "/stream"
        return f"{base}?streams={'/'.join(subscriptions)}"

    def subscribe_messages(self, streams: Sequence[str], on_connect: bool) -> list[str]:
        if on_connect:
            return []  # the URL carries them
        return [self._method("SUBSCRIBE", streams)]

    def unsubscribe_messages(self, streams: Sequence[str]) -> list[str]:
        return [self._method("UNSUBSCRIBE", streams)]

    def check_subscriptions(self, streams: Sequence[str]) -> None:
        _check_streams(streams)

    def _method(self, method: str, streams: Sequence[str]) -> str:
        self._next_id += 1
        return json.dumps({"method": method, "params": list(streams), "id": self._next_id})

    def parse(self, message: str | bytes, recv_ns: int) -> tuple[TradeBatch, Quarantine]:
        """One frame -> (trades, quarantine records); never raises.

        Examples
        --------
        >>> feed = BinanceFeed(SymbolTable(), ["ftmusdt@aggTrade"], sink=lambda b, q: None)
        >>> frame = ('{"stream":"ftmusdt@aggTrade","data":{"e":"aggTrade","E":1628952396573,'
        ...          '"s":"FTMUSDT","a":31718372,"p":"0.33993000","q":"99.90000000",'
        ...          '"f":38248910,"l":38248912,"T":1628952396572,"m":true,"M":true}}')
        >>> b, q = feed.parse(frame, recv_ns=0)
        >>> b.trade_id.tolist(), b.count.tolist(), b.side.tolist(), len(q)
        ([31718372], [3], [-1], 0)
        >>> b, q = feed.parse('{"stream":"ftmusdt@aggTrade","data":{"e":"aggTr', recv_ns=0)
        >>> len(b), q.counts(), q.raw[0][:22]
        (0, {'malformed': 1}, '{"stream":"ftmusdt@agg')
        """
        try:
            frame = _loads(message)
        except (ValueError, RecursionError):  # includes invalid UTF-8 in a binary frame
            return TradeBatch(), _bad(message, "malformed")
        if not isinstance(frame, dict):
            return TradeBatch(), _bad(message, "malformed")
        if "id" in frame and ("result" in frame or "error" in frame):
            if frame.get("error") is not None:
                self.tracker.error(f"binance refused a request: {str(frame['error'])[:200]}")
            self.tracker.ignored("response")
            return TradeBatch(), Quarantine()
        kind = stream_kind(frame)
        data = frame.get("data", frame)
        try:
            if not isinstance(data, dict):
                raise TypeError("data is not an object")
            if kind in ("aggTrade", "trade"):
                row = (parse_agg_trade if kind == "aggTrade" else parse_trade)(data, recv_ns)
                batch = rows_to_batch([row], self.table)
                self._cover_trade(row[0], row[7], row[8])
                return batch, Quarantine()
            if kind.startswith("kline"):
                self._keep_kline(parse_kline(data, recv_ns / NS))
                return TradeBatch(), Quarantine()
        except KeyError:
            return TradeBatch(), _bad(message, "missing_field")
        except (ValueError, TypeError, OverflowError):
            return TradeBatch(), _bad(message, "malformed")
        self.tracker.ignored(kind)
        return TradeBatch(), Quarantine()

    def after_sink(self) -> None:
        if self.bar_lookup is not None:
            self.crosscheck(self.bar_lookup)

    # -- klines and their cross-check -----------------------------------------------------------

    def klines(self) -> dict[str, dict]:
        """The latest kline update per symbol (see :func:`parse_kline` for the fields)."""
        with self._klines_lock:
            return dict(self._latest_klines)

    def _keep_kline(self, k: dict) -> None:
        with self._klines_lock:
            self._latest_klines[k["symbol"]] = k
            if k["closed"] and k["interval"] == "1m":
                self._closed_klines.append(k)
                self.wake_consumer = True  # cross-check once the trades before it are pushed

    def _cover_trade(self, symbol: str, first: int, last: int) -> None:
        with self._klines_lock:
            c = self._cover.get(symbol)
            if c is None or first > c[1] + 1:  # new symbol or a gap: coverage starts again
                self._cover[symbol] = [first, last, deque([last], maxlen=10_000)]
            elif last > c[1]:
                c[1] = last
                c[2].append(last)

    def crosscheck(self, bar_lookup: BarLookup) -> list[dict]:
        """Compare closed 1m klines with our bars; return (and record) the divergences.

        A kline is compared once our trades cover its whole minute without a gap: its first
        raw trade id ``f`` is at or after where our gap-free coverage began and its last ``L``
        has arrived and ends one of our aggTrades (USDT-M sometimes closes a kline part-way
        through an aggTrade; no aggTrade-fed bar can match that). Klines that can never be
        checked are counted in ``klines_unverifiable``; those still waiting for trades stay.
        """
        out: list[dict] = []
        with self._klines_lock:
            pending, ready = [], []
            for k in self._closed_klines:
                c = self._cover.get(k["symbol"])
                if c is not None and k["first_id"] >= c[0] and k["last_id"] in c[2]:
                    ready.append(k)
                elif c is not None and (k["first_id"] < c[0] or k["last_id"] <= c[1]):
                    self.klines_unverifiable += 1
                else:
                    pending.append(k)
            self._closed_klines = deque(pending, maxlen=self._closed_klines.maxlen)
        for k in ready:
            self.klines_checked += 1
            ours = bar_lookup(k["symbol"], k["t"] * 1_000_000)
            diffs = _kline_diffs(k, ours)
            if diffs:
                event = {"symbol": k["symbol"], "minute": k["t"] * 1_000_000, "fields": diffs}
                self.tracker.event("kline_divergence", **event)
                out.append(event)
        return out


def _check_streams(streams: Sequence[str]) -> None:
    channels: dict[str, set[str]] = {}
    for s in streams:
        sym, _, chan = s.partition("@")
        if not sym or not chan:
            raise FeedError(f"binance: bad stream name {s!r} (expected e.g. btcusdt@aggTrade)")
        channels.setdefault(sym, set()).add(chan)
    both = sorted(sym for sym, ch in channels.items() if set(TRADE_CHANNELS) <= ch)
    if both:  # aggTrade and trade ids are different series: the dedupe would mix them up
        raise FeedError(f"binance: subscribe {both[0]} to @aggTrade or @trade, not both")


def _kline_diffs(k: dict, ours: dict | None) -> dict[str, tuple]:
    if ours is None:
        return {"bar": (None, "missing")}
    diffs = {}
    for f in ("open", "high", "low", "close"):
        if float(ours[f]) != k[f]:
            diffs[f] = (float(ours[f]), k[f])
    if not math.isclose(float(ours["volume"]), k["volume"], rel_tol=1e-9, abs_tol=1e-12):
        diffs["volume"] = (float(ours["volume"]), k["volume"])
    if int(ours["trades"]) != k["trades"]:
        diffs["trades"] = (int(ours["trades"]), k["trades"])
    return diffs


def _bad(message: str | bytes, reason: str) -> Quarantine:
    text = message if isinstance(message, str) else message[:2000].decode("utf-8", "replace")
    return Quarantine.malformed([text], reason)


def flow_bar_lookup(flow) -> BarLookup:
    """A ``bar_lookup`` reading the 1m bars of a :class:`~flows.pipeline.Flow`."""

    def lookup(symbol: str, minute_ns: int) -> dict | None:
        df = flow.bars("1m", symbol)
        hit = df.index.asi8 == minute_ns
        return df[hit].iloc[0].to_dict() if hit.any() else None

    return lookup


def start_binance(flow, symbols: Sequence[str], *, url: str | None = None, kind: str = "spot",
                  trades: str = "aggTrade", kline: bool = True,
                  config: ConnectionConfig | None = None, **kwargs) -> BinanceFeed:
    """Run Binance streams for ``symbols`` into ``flow`` (as :func:`flows.runner.start_simulated`
    does for the simulated market): the feed's state drives ``flow.feed_state``, its health is
    ``flow.feed_health()``, klines are cross-checked against the flow's 1m bars, and the
    flusher persists. Stop with ``feed.stop()``.
    """
    streams = stream_names(symbols, trades=trades, kline=kline)

    def on_state(state: str) -> None:
        flow.feed_state = state

    if config is not None:
        kwargs["config"] = config
    feed = BinanceFeed(flow.table, streams, flow.push, url=url, kind=kind,
                       bar_lookup=flow_bar_lookup(flow) if kline else None, on_state=on_state,
                       **kwargs)
    flow.register_feed(feed.tracker.feed, feed.health)
    flow.start_flusher()
    return feed.start()
