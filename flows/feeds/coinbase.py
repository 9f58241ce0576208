"""Coinbase Exchange websocket ``matches`` channel: match frames as trades, gaps as info.

:class:`CoinbaseParser` is pure -- no I/O -- so the shared websocket layer
(:mod:`flows.feeds.connection`) calls it once per received frame, and a recorded capture is
parsed the same way (:func:`capture_frames`). Each ``match``/``last_match`` frame becomes exactly
one trade, or one quarantine record when a field is missing or unreadable; ``ticker``,
``subscriptions`` and ``heartbeat`` frames carry no new trade and are only counted.

Gaps. A match's ``sequence`` counts every message of the product's full order-book channel
(opens, changes, dones), so consecutive matches are typically hundreds of sequence numbers apart
and a sequence jump says nothing about missed trades. ``trade_id`` is numbered contiguously per
product (every one of the 97 follow-on matches in the 2021 capture is its predecessor's id + 1),
so a jump in ``trade_id`` is what reveals a lost match; ``sequence`` is used to spot frames
arriving out of order or twice.

:class:`CoinbaseFeed` runs the parser on a :class:`~flows.feeds.connection.WebsocketFeed`
(reconnect, idle timeout, circuit breaker, health): it sends the subscribe message on every
connect, so a reconnect resubscribes exactly the current products. Coinbase then sends a
``last_match`` per product -- usually a trade we already have (counted as ``overlap`` in the
feed's health; the flow's validator drops it as a duplicate by ``trade_id``), or, when trades
happened while we were away, a jump in ``trade_id`` (a ``trade_id_gap`` event with the number
of missed trades). ``heartbeat`` is subscribed too: a frame a second per product keeps a quiet
product from looking like a dead connection.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.feeds import FeedError
from flows.feeds.connection import ConnectionConfig, Sink, WebsocketFeed
from flows.schema import BUY, NS, SELL, Quarantine, SymbolTable, TradeBatch

__all__ = ["CHANNELS", "DEFAULT_URL", "CoinbaseFeed", "CoinbaseParser", "capture_frames",
           "iso_to_ns", "product_ids", "start_coinbase", "subscribe_message"]

#: Coinbase Exchange's public websocket feed.
DEFAULT_URL = "wss://ws-feed.exchange.coinbase.com"
#: Channels :class:`CoinbaseFeed` subscribes by default.
CHANNELS = ("matches", "heartbeat")
#: Frame types that carry a trade.
MATCH_TYPES = ("match", "last_match")
_PRODUCT = re.compile(r"[A-Z0-9]{1,20}-[A-Z0-9]{1,20}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_ID = 2**62


def subscribe_message(product_ids: Sequence[str], channels: Sequence[str] = ("matches",)
                      ) -> dict[str, Any]:
    """Return the subscribe message for ``product_ids`` (send it as JSON after connecting).

    Coinbase answers with a ``subscriptions`` frame, then sends one ``last_match`` per product
    (the most recent trade, which may predate the connection) and a ``match`` per new trade.

    Examples
    --------
    >>> subscribe_message(["BTC-USD", "ETH-USD"])
    {'type': 'subscribe', 'product_ids': ['BTC-USD', 'ETH-USD'], 'channels': ['matches']}
    """
    if isinstance(product_ids, str) or not product_ids:
        raise ValueError("product_ids must be a non-empty list of product ids such as 'BTC-USD'")
    return {"type": "subscribe", "product_ids": list(product_ids), "channels": list(channels)}


def iso_to_ns(text: str) -> int:
    """Return ISO-8601 time text (``...Z`` or an offset; naive is UTC) as int ns since the epoch.

    Examples
    --------
    >>> iso_to_ns("2021-04-17T16:43:30.244075Z")
    1618677810244075000
    """
    if not isinstance(text, str):
        raise TypeError(f"time must be text, got {type(text).__name__}")
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86400 + delta.seconds) * NS + delta.microseconds * 1000


def _number(value: Any) -> float:
    """Return a JSON number or numeric text as float; anything else is malformed."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    out = int(value)
    if not 0 <= out < _MAX_ID:
        raise ValueError(f"id {out} out of range")
    return out


def _decode(frame: Any) -> Any:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        frame = bytes(frame).decode("utf-8")
    if isinstance(frame, str):
        return json.loads(frame)
    return frame


def _raw(frame: Any) -> str:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame).decode("utf-8", "replace")
    if isinstance(frame, str):
        return frame
    try:
        return json.dumps(frame, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(frame)[:500]


class CoinbaseParser:
    """Turn ``matches``-channel frames into trades; track per-product trade ids for gaps.

    Parameters
    ----------
    symbols : the flow's symbol table; product ids (``BTC-USD``) become symbol names.

    Each call to :meth:`parse` returns ``(trades, quarantine, info)`` where ``info`` holds

    - ``ignored``: frames without a trade, by type (``{"ticker": 1}``);
    - ``gaps``: one dict per lost run of matches, ``{"product_id", "after_trade_id",
      "next_trade_id", "missing"}``;
    - ``out_of_order``: matches whose ``sequence`` is not above the product's last one
      (replayed or reordered frames; still parsed -- the validator drops true duplicates),
      ``{"product_id", "sequence", "last_sequence", "trade_id"}``;
    - ``fatal``: the message of an ``error`` frame (a refused subscription or bad request:
      sending the same request again cannot succeed; the key Polygon uses for ``auth_failed``).

    Keys are present only when they have something to say.

    Examples
    --------
    A real frame (coinbase_pro_ws_matches_ticker_2021-04-17.jsonl)::

        {"type":"match","trade_id":881614,"maker_order_id":"...","taker_order_id":"...",
         "side":"sell","size":"0.14","price":"14.7816","product_id":"BAND-GBP",
         "sequence":333939588,"time":"2021-04-17T16:43:44.081925Z"}

    ``side`` is the maker's side, so the aggressor (taker) bought:

    >>> p = CoinbaseParser(SymbolTable())
    >>> frame = ('{"type":"match","trade_id":881614,"side":"sell","size":"0.14",'
    ...          '"price":"14.7816","product_id":"BAND-GBP","sequence":333939588,'
    ...          '"time":"2021-04-17T16:43:44.081925Z"}')
    >>> trades, bad, info = p.parse(frame, recv_ns=1618677824090000000)
    >>> trades.price.tolist(), trades.side.tolist(), trades.trade_id.tolist(), len(bad)
    ([14.7816], [1], [881614], 0)
    >>> _, _, info = p.parse(frame.replace("881614", "881617").replace("333939588", "333939600"),
    ...                      recv_ns=0)
    >>> info["gaps"]
    [{'product_id': 'BAND-GBP', 'after_trade_id': 881614, 'next_trade_id': 881617, 'missing': 2}]
    """

    def __init__(self, symbols: SymbolTable):
        self.symbols = symbols
        #: last trade id and sequence seen per product id.
        self.last_trade_id: dict[str, int] = {}
        self.last_sequence: dict[str, int] = {}
        #: totals since construction.
        self.trades = 0
        self.gaps = 0
        self.missing = 0
        self.ignored: Counter = Counter()

    def parse(self, frame: dict | list | str | bytes, recv_ns: int
              ) -> tuple[TradeBatch, Quarantine, dict[str, Any]]:
        """Parse one frame (or a list of frames received together) at receive time ``recv_ns``."""
        info: dict[str, Any] = {}
        rows: list[tuple] = []
        bad: list[tuple[str, str]] = []
        try:
            decoded = _decode(frame)
        except (UnicodeDecodeError, ValueError, RecursionError):
            decoded = None
            bad.append((_raw(frame), "malformed"))
        frames = decoded if isinstance(decoded, list) else [] if decoded is None else [decoded]
        for f in frames:
            self._one(f, rows, bad, info)
        if rows:
            cols = list(zip(*rows))
            trades = TradeBatch.from_columns(self.symbols, symbol=cols[0], time=cols[1],
                                             price=cols[2], size=cols[3], trade_id=cols[4],
                                             side=cols[5], recv_time=recv_ns)
        else:
            trades = TradeBatch()
        self.trades += len(trades)
        quarantine = Quarantine.concat([Quarantine.malformed([r], why) for r, why in bad])
        return trades, quarantine, info

    __call__ = parse

    def _one(self, f: Any, rows: list[tuple], bad: list[tuple[str, str]], info: dict) -> None:
        if not isinstance(f, dict) or not isinstance(f.get("type"), str):
            bad.append((_raw(f), "malformed"))
            return
        kind = f["type"]
        if kind not in MATCH_TYPES:
            if kind == "error":
                info["fatal"] = str(f.get("message", "error")) + (
                    f": {f['reason']}" if f.get("reason") else "")
            ignored = info.setdefault("ignored", {})
            ignored[kind] = ignored.get(kind, 0) + 1
            self.ignored[kind] += 1
            return
        try:
            product = f["product_id"]
            if not isinstance(product, str) or not product.strip():
                raise ValueError("product_id must be non-empty text")
            product = product.strip()
            maker = f["side"]
            if maker not in ("buy", "sell"):
                raise ValueError(f"unknown side {maker!r}")
            row = (product, iso_to_ns(f["time"]), _number(f["price"]), _number(f["size"]),
                   _integer(f["trade_id"]), SELL if maker == "buy" else BUY)
            sequence = _integer(f["sequence"]) if "sequence" in f else None
        except KeyError:
            bad.append((_raw(f), "missing_field"))
            return
        except (TypeError, ValueError, OverflowError):
            bad.append((_raw(f), "malformed"))
            return
        rows.append(row)
        self._track(product, row[4], sequence, info)

    def _track(self, product: str, trade_id: int, sequence: int | None, info: dict) -> None:
        last_id = self.last_trade_id.get(product)
        if last_id is not None and trade_id > last_id + 1:
            missing = trade_id - last_id - 1
            info.setdefault("gaps", []).append({"product_id": product, "after_trade_id": last_id,
                                                "next_trade_id": trade_id, "missing": missing})
            self.gaps += 1
            self.missing += missing
        if last_id is None or trade_id > last_id:
            self.last_trade_id[product] = trade_id
        if sequence is not None:
            last_seq = self.last_sequence.get(product)
            if last_seq is not None and sequence <= last_seq:
                info.setdefault("out_of_order", []).append(
                    {"product_id": product, "sequence": sequence, "last_sequence": last_seq,
                     "trade_id": trade_id})
            else:
                self.last_sequence[product] = sequence


def capture_frames(path: str | os.PathLike) -> Iterator[tuple[Any, int]]:
    """Yield ``(frame, recv_ns)`` from a capture of ``{"recv_ts": <unix s>, "frame": ...}`` lines.

    Lines that are not such JSON objects are yielded as ``(line text, 0)``, so the parser
    quarantines them rather than the reader dropping them.
    """
    with Path(path).open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                yield obj["frame"], round(float(obj["recv_ts"]) * NS)
            except (ValueError, KeyError, TypeError, OverflowError):
                yield line.decode("utf-8", "replace").strip(), 0


# --------------------------------------------------------------------------- the live feed

def product_ids(symbols: str | Iterable[str]) -> list[str]:
    """Return Coinbase product ids (``BASE-QUOTE``, upper case) for ``symbols``, deduplicated.

    Examples
    --------
    >>> product_ids(["btc-usd", " ETH-EUR ", "BTC-USD"]), product_ids("SKL-USD,BAND-GBP")
    (['BTC-USD', 'ETH-EUR'], ['SKL-USD', 'BAND-GBP'])
    >>> product_ids(["BTCUSD"])
    Traceback (most recent call last):
    ...
    flows.feeds.FeedError: coinbase: bad product id 'BTCUSD' (expected e.g. BTC-USD)
    """
    if isinstance(symbols, str):
        symbols = symbols.split(",")
    out = []
    for s in symbols:
        p = str(s).strip().upper()
        if not _PRODUCT.fullmatch(p):
            raise FeedError(f"coinbase: bad product id {s!r} (expected e.g. BTC-USD)")
        out.append(p)
    return list(dict.fromkeys(out))


class CoinbaseFeed(WebsocketFeed):
    """Coinbase ``matches`` into ``sink`` as TradeBatch, resilient to drops and bad frames.

    Parameters
    ----------
    table : the flow's symbol table (symbols are product ids, ``BTC-USD``).
    products : product ids to subscribe (:func:`product_ids` normalizes them).
    sink : ``sink(batch, unparsed)``, e.g. ``flow.push``.
    url : the endpoint; default :data:`DEFAULT_URL`.
    channels : channels of the subscribe message; ``matches`` carries the trades.
    **kwargs : :class:`~flows.feeds.connection.WebsocketFeed` options (config, clock, rng, ...).

    Frames without a trade are counted in the health's ``ignored`` by type; an ``error`` frame
    (a refused subscription) fails the feed with Coinbase's message, without retrying.
    Matches arriving with an old ``sequence`` but a new ``trade_id`` (reordered, not
    replayed) are recorded as ``out_of_order`` events.

    Examples
    --------
    >>> feed = CoinbaseFeed(SymbolTable(), ["band-gbp"], sink=lambda b, q: None)
    >>> feed.subscriptions
    ['BAND-GBP']
    >>> json.loads(feed.subscribe_messages(feed.subscriptions, on_connect=True)[0])["channels"]
    ['matches', 'heartbeat']
    >>> b, q = feed.parse('{"type":"heartbeat","last_trade_id":881614,"product_id":"BAND-GBP",'
    ...                   '"sequence":333939590,"time":"2021-04-17T16:43:45.0Z"}', recv_ns=0)
    >>> len(b), len(q), feed.health().ignored
    (0, 0, {'heartbeat': 1})
    """

    name = "coinbase"

    def __init__(self, table: SymbolTable, products: str | Iterable[str], sink: Sink, *,
                 url: str | None = None, channels: Sequence[str] = CHANNELS, **kwargs):
        if "matches" not in channels:
            raise FeedError("coinbase: the matches channel carries the trades; keep it in channels")
        products = product_ids(products)
        if not products:
            raise FeedError("coinbase: no products to subscribe")
        super().__init__(sink, products, **kwargs)
        self.table, self.channels = table, tuple(channels)
        self.endpoint = url or DEFAULT_URL
        self.parser = CoinbaseParser(table)

    # -- WebsocketFeed hooks ------------------------------------------------------------------

    def url(self, subscriptions: Sequence[str]) -> str:
        return self.endpoint

    def subscribe_messages(self, streams: Sequence[str], on_connect: bool) -> list[str]:
        if not streams:
            return []
        return [json.dumps(subscribe_message(list(streams), self.channels))]

    def unsubscribe_messages(self, streams: Sequence[str]) -> list[str]:
        return [json.dumps({"type": "unsubscribe", "product_ids": list(streams),
                            "channels": list(self.channels)})]

    def check_subscriptions(self, streams: Sequence[str]) -> None:
        product_ids(streams)

    def subscribe(self, streams: str | Iterable[str]) -> None:
        """Add products (normalized like :func:`product_ids`) now and on every reconnect."""
        super().subscribe(product_ids(streams))

    def unsubscribe(self, streams: str | Iterable[str]) -> None:
        super().unsubscribe(product_ids(streams))

    def parse(self, message: str | bytes, recv_ns: int) -> tuple[TradeBatch, Quarantine]:
        """One frame -> (trades, quarantine records); never raises for bad input."""
        trades, bad, info = self.parser.parse(message, recv_ns)
        for kind, n in info.get("ignored", {}).items():
            for _ in range(n):
                self.tracker.ignored(kind)
        for entry in info.get("out_of_order", []):
            # At or below the highest id seen it is a replay, counted as overlap by the tracker.
            last = self.tracker.last_id(self.table.lookup(entry["product_id"]))
            if last is None or entry["trade_id"] > last:
                self.tracker.event("out_of_order", **entry)
        if "fatal" in info:
            self.give_up(f"coinbase refused the request: {info['fatal']}")
        return trades, bad


def start_coinbase(flow, symbols: str | Sequence[str], *, url: str | None = None,
                   config: ConnectionConfig | None = None, **kwargs) -> CoinbaseFeed:
    """Run Coinbase ``matches`` for the products ``symbols`` into ``flow``; return the feed.

    The feed's state drives ``flow.feed_state``, its health is registered with
    ``flow.register_feed``, its batches are pushed as feed ``coinbase`` (the per-feed quality
    score), and the flow's flusher persists. Stop with ``feed.stop()``.
    """
    if config is not None:
        kwargs["config"] = config
    name = kwargs.setdefault("name", CoinbaseFeed.name)

    def on_state(state: str) -> None:
        flow.feed_state = state

    def sink(batch: TradeBatch, unparsed: Quarantine) -> None:
        flow.push(batch, unparsed, feed=name)

    feed = CoinbaseFeed(flow.table, symbols, sink, url=url, on_state=on_state, **kwargs)
    flow.register_feed(name, feed.health)
    flow.start_flusher()
    return feed.start()
