"""Record a venue's websocket frames to JSONL, exactly as received, for ``tapeflow replay``.

The file is the capture format of ``tests/data`` -- one JSON object a line,
``{"recv_ts": <unix s>, "frame": <frame exactly as received>}`` -- after one header line that
names the venue and the subscriptions::

    {"tapeflow_record":1,"venue":"binance","kind":"spot","url":"wss://...","streams":[...],
     "symbols":[...],"started":"2026-11-22T00:14:42.123456Z"}

A frame that is not JSON (or not UTF-8) is still written, as text under ``raw``
(``{"recv_ts": ..., "raw": "..."}``), so a replay quarantines it with a count instead of the
recorder dropping it. Each line is flushed as it is written: a recorder killed at any moment
leaves a file whose every complete line replays.

The connection is the venue's own feed class (:class:`~flows.feeds.binance.BinanceFeed`, the
Coinbase and Polygon feeds) with one hook: every frame is written before it is parsed. So the
recorder reconnects, resubscribes, authenticates and gives up exactly as the live feed does, and
the frames it parses feed only the summary's trade count.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from flows.feeds import FeedError
from flows.feeds.connection import ConnectionConfig, WebsocketFeed
from flows.schema import NS, Quarantine, SymbolTable, TradeBatch

__all__ = ["HEADER_KEY", "VENUES", "CaptureWriter", "RawFrame", "Recording", "capture_line",
           "capture_records", "read_header", "sniff_venue", "start_recording"]

#: The header line's marker key; its value is the format version.
HEADER_KEY = "tapeflow_record"
RECORD_VERSION = 1
#: Venues that can be recorded.
VENUES = ("binance", "coinbase", "polygon")
_RECORD_LIMIT = 64 << 20  # frames up to this size are recorded whole (the live feed's hard limit)


def capture_line(message: str | bytes, recv_ns: int) -> bytes:
    """Return one capture line (newline included) for a frame received at ``recv_ns``.

    A JSON frame is written as received (line breaks between its tokens become spaces, the
    only change, so the line stays one line); anything else goes under ``raw`` as text.

    Examples
    --------
    >>> capture_line('{"e":"aggTrade",\\n "p":"1.5"}', 1628952397705977200)
    b'{"recv_ts":1628952397.7059772,"frame":{"e":"aggTrade",  "p":"1.5"}}\\n'
    >>> capture_line(b"\\xff{not json", 1628952397000000000)
    b'{"recv_ts":1628952397.0,"raw":"\\\\ufffd{not json"}\\n'
    """
    return _line(message, recv_ns)[0]


def _line(message: str | bytes, recv_ns: int) -> tuple[bytes, bool]:
    """The capture line, and whether the frame went under ``raw``."""
    ts = repr(recv_ns / NS).encode()
    try:
        text = message.decode("utf-8") if isinstance(message, (bytes, bytearray)) else message
        json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        text = message.decode("utf-8", "replace") if isinstance(message, (bytes, bytearray)) else message
        return b'{"recv_ts":%s,"raw":%s}\n' % (ts, json.dumps(text).encode()), True
    # Raw CR/LF cannot occur inside a JSON string, so these are whitespace between tokens.
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return b'{"recv_ts":%s,"frame":%s}\n' % (ts, text.encode("utf-8")), False


def read_header(line: bytes | str) -> dict | None:
    """Return the header of a recording if ``line`` is one, else None.

    Examples
    --------
    >>> read_header('{"tapeflow_record":1,"venue":"coinbase","streams":["BTC-USD"]}')["venue"]
    'coinbase'
    >>> read_header('{"recv_ts":1.0,"frame":{}}') is None
    True
    """
    if HEADER_KEY.encode() not in (line if isinstance(line, bytes) else line.encode()):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and HEADER_KEY in obj and "frame" not in obj else None


class RawFrame(str):
    """The text of a recorded frame that was not JSON (a ``raw`` line)."""


def capture_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes, Any, float]]:
    """Yield ``(bytes read so far, line, frame, recv_ts)`` for every line of a capture.

    ``frame`` is the decoded frame, a :class:`RawFrame` for a ``raw`` line, or None when the
    line is not a capture record at all (``recv_ts`` is then NaN). Blank lines and recording
    headers are skipped: they hold no frame.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write(b'{"tapeflow_record":1,"venue":"binance"}\\n{"recv_ts":2.5,"frame":{"e":"x"}}\\n'
    ...                 b'{"recv_ts":3.0,"raw":"{oops"}\\nnot json\\n')
    >>> [(frame, ts) for _, _, frame, ts in capture_records(f.name)]
    [({'e': 'x'}, 2.5), ('{oops', 3.0), (None, nan)]
    """
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            pos += len(line)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                recv_ts = float(rec["recv_ts"])
                if "frame" in rec:
                    frame = rec["frame"]
                elif isinstance(rec.get("raw"), str):
                    frame = RawFrame(rec["raw"])
                else:
                    raise KeyError("frame")
            except (ValueError, KeyError, TypeError, RecursionError):
                if read_header(line) is None:
                    yield pos, line, None, math.nan
                continue
            yield pos, line, frame, recv_ts


def sniff_venue(path: str | os.PathLike, lines: int = 200) -> tuple[str | None, dict | None]:
    """Return ``(venue, header)`` of a JSONL capture: from its header line when it has one,
    else from the shape of its first frames (None when they say nothing).

    Binance frames are ``{"stream": ..., "data": ...}`` envelopes or carry ``"e"``; Coinbase
    frames carry ``"type"``; Polygon frames are arrays of events carrying ``"ev"``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write('{"recv_ts":1.0,"frame":[{"ev":"status","status":"connected"}]}\\n')
    >>> sniff_venue(f.name)
    ('polygon', None)
    """
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i >= lines:
                break
            if not line.strip():
                continue
            header = read_header(line)
            if header is not None:
                return str(header.get("venue")), header
            try:
                frame = json.loads(line)["frame"]
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            for f_ in (frame if isinstance(frame, list) else [frame]):
                if isinstance(f_, dict):
                    if "ev" in f_:
                        return "polygon", None
                    if "stream" in f_ or "e" in f_:
                        return "binance", None
                    if "type" in f_:
                        return "coinbase", None
    return None, None


class CaptureWriter:
    """Write a header line, then one capture line per frame, flushing every line.

    Parameters
    ----------
    path : the file to create.
    header : venue, subscriptions and the like (``tapeflow_record`` and ``started`` are added).
    overwrite : replace an existing file instead of refusing.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "rec.jsonl"
    >>> w = CaptureWriter(path, {"venue": "binance"})
    >>> w.write('{"e":"trade"}', 10**18); w.write("oops", 10**18); w.close()
    >>> w.frames, w.unparsable, path.read_text().count("\\n")
    (2, 1, 3)
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        try:
            self._file: BinaryIO | None = open(self.path, "wb" if overwrite else "xb")  # noqa: SIM115 -- held until close()
        except FileExistsError:
            raise FeedError(f"{self.path}: already exists; choose another file or pass --force") from None
        except OSError as exc:
            raise FeedError(f"{self.path}: cannot create: {exc.strerror or exc}") from None
        self.header = {HEADER_KEY: RECORD_VERSION, **header,
                       "started": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        self._lock = threading.Lock()
        #: frames written, those written as ``raw`` text, and bytes written (header included).
        self.frames = 0
        self.unparsable = 0
        self.bytes = 0
        try:
            self._put(json.dumps(self.header, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            self.close()
            raise FeedError(f"{self.path}: cannot write: {exc.strerror or exc}") from None

    def _put(self, line: bytes) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            self._file.flush()
            self.bytes += len(line)

    def write(self, message: str | bytes, recv_ns: int) -> None:
        """Append one frame received at ``recv_ns``."""
        line, raw = _line(message, recv_ns)
        self._put(line)
        self.frames += 1
        self.unparsable += raw

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:  # the write that failed already said why
                    pass
                self._file = None


class _RecordingFeed:
    """Mixin for a :class:`WebsocketFeed` subclass: write every frame before parsing it.

    A frame that cannot be written (disk full, ...) fails the feed with the reason: a
    recording with a hole would replay as if nothing had been missed."""

    writer: CaptureWriter

    def parse(self, message: str | bytes, recv_ns: int) -> tuple[TradeBatch, Quarantine]:
        try:
            self.writer.write(message, recv_ns)
        except OSError as exc:
            self.give_up(f"{self.writer.path}: cannot write: {exc.strerror or exc}")  # type: ignore[attr-defined]
        return super().parse(message, recv_ns)  # type: ignore[misc]


def _recording(cls: type[WebsocketFeed]) -> type[WebsocketFeed]:
    return type(f"Recording{cls.__name__}", (_RecordingFeed, cls), {})


@dataclass
class _Counts:
    trades: int = 0
    quarantined: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, batch: TradeBatch, unparsed: Quarantine) -> None:
        with self.lock:
            self.trades += len(batch)
            self.quarantined += len(unparsed)


def _binance(symbols: Sequence[str], sink, config: ConnectionConfig, url: str | None, kind: str,
             **_) -> tuple[WebsocketFeed, dict]:
    from flows.feeds.binance import BinanceFeed, stream_names

    streams = stream_names(symbols, kline=True)
    feed = _recording(BinanceFeed)(SymbolTable(), streams, sink, url=url, kind=kind, config=config)
    return feed, {"kind": kind, "streams": streams}


def _coinbase(symbols: Sequence[str], sink, config: ConnectionConfig, url: str | None,
              **_) -> tuple[WebsocketFeed, dict]:
    from flows.feeds.coinbase import CoinbaseFeed, product_ids

    products = product_ids(symbols)
    feed = _recording(CoinbaseFeed)(SymbolTable(), products, sink, url=url, config=config)
    return feed, {"streams": products}


def _polygon(symbols: Sequence[str], sink, config: ConnectionConfig, url: str | None,
             key: str | None, bars: bool, **_) -> tuple[WebsocketFeed, dict]:
    from flows.feeds.polygon import KEY_ENV, PolygonFeed, channel_names

    key = key or os.environ.get(KEY_ENV, "")
    if not key.strip():
        raise FeedError(f"polygon: no API key; set {KEY_ENV}")
    channels = channel_names(symbols, bars=bars)
    bar_sink = (lambda tf, bars: None) if bars else None  # the frames are in the file already
    feed = _recording(PolygonFeed)(SymbolTable(), channels, sink, key=key, url=url,
                                   bar_sink=bar_sink, config=config)
    return feed, {"bars": bars, "streams": channels}


# As the live feeds: Binance drops connections after 24 h; Polygon sends no heartbeat.
_DEFAULT_CONFIG = {"binance": ConnectionConfig(max_session_s=23.5 * 3600),
                   "coinbase": ConnectionConfig(), "polygon": ConnectionConfig(idle_s=120.0)}
_FEEDS: dict[str, Callable[..., tuple[WebsocketFeed, dict]]] = {
    "binance": _binance, "coinbase": _coinbase, "polygon": _polygon}


class Recording:
    """A running recorder: a venue feed whose frames go to a :class:`CaptureWriter`.

    Attributes
    ----------
    feed : the venue's websocket feed (health, state, failure).
    writer : the capture file (frames, bytes, unparsable).
    trades, quarantined : what the recorded frames parsed into so far.
    """

    def __init__(self, feed: WebsocketFeed, writer: CaptureWriter, counts: _Counts):
        self.feed, self.writer, self._counts = feed, writer, counts
        self.started = time.monotonic()

    @property
    def trades(self) -> int:
        return self._counts.trades

    @property
    def quarantined(self) -> int:
        return self._counts.quarantined

    @property
    def failure(self) -> str | None:
        return self.feed.failure

    def stop(self) -> None:
        """Close the connection and the file (every frame received is in it)."""
        try:
            self.feed.stop()
        finally:
            self.writer.close()

    def summary(self) -> str:
        """One line: what was recorded, from where, into which file."""
        h = self.feed.health()
        seconds = time.monotonic() - self.started
        extra = f", {self.writer.unparsable:,} not JSON" if self.writer.unparsable else ""
        again = f", {h.reconnects:,} reconnects" if h.reconnects else ""
        return (f"recorded {self.writer.frames:,} frames ({self.writer.bytes:,} bytes, "
                f"{self.trades:,} trades{extra}{again}) from {self.feed.name} in {seconds:.1f} s "
                f"to {self.writer.path}")


def start_recording(venue: str, symbols: Sequence[str], path: str | os.PathLike, *,
                    url: str | None = None, kind: str = "spot", key: str | None = None,
                    bars: bool = False, overwrite: bool = False,
                    config: ConnectionConfig | None = None) -> Recording:
    """Connect to ``venue`` for ``symbols`` and write every frame received to ``path``.

    Parameters
    ----------
    venue : ``binance``, ``coinbase`` or ``polygon``.
    symbols : Binance symbols (``btcusdt``; their ``@aggTrade`` and ``@kline_1m`` streams),
        Coinbase product ids (``BTC-USD``) or Polygon tickers (``AAPL``, ``*``).
    url : the endpoint; default the venue's public one.
    kind : Binance ``spot`` or ``usdm``.
    key, bars : Polygon API key (default from ``POLYGON_API_KEY``) and minute aggregates
        instead of trades.
    overwrite : replace ``path`` if it exists (default: refuse).
    config : connection settings; frames up to 64 MiB are recorded whole in any case.

    Raises
    ------
    FeedError
        For an unknown venue, bad symbols, or a file that exists or cannot be created.
    """
    if venue not in _FEEDS:
        raise FeedError(f"record: unknown venue {venue!r}; choose from {', '.join(VENUES)}")
    symbols = [s for s in symbols if s.strip()]
    if not symbols:
        raise FeedError(f"record: give {venue} symbols to record")
    base = config or _DEFAULT_CONFIG[venue]
    # Every frame reaches parse (and so the file): nothing is cut at max_frame_bytes.
    config = ConnectionConfig(**{**base.__dict__, "max_frame_bytes": _RECORD_LIMIT,
                                 "hard_max_frame_bytes": max(base.hard_max_frame_bytes, _RECORD_LIMIT)})
    counts = _Counts()
    feed, header = _FEEDS[venue](symbols, counts, config, url=url, kind=kind, key=key, bars=bars)
    header = {"venue": venue, **header, "url": _public_url(feed), "symbols": list(symbols),
              "recorder": "tapeflow"}
    writer = CaptureWriter(path, header, overwrite=overwrite)
    feed.writer = writer  # type: ignore[attr-defined]
    recording = Recording(feed, writer, counts)
    try:
        feed.start()
    except BaseException:
        writer.close()
        raise
    return recording


def _public_url(feed: WebsocketFeed) -> str:
    """The URL the feed opens, without a query string that might carry a key."""
    url = feed.url(feed.subscriptions)
    return url if "key=" not in url.lower() else url.split("?", 1)[0]
