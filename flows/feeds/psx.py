"""Pakistan Stock Exchange quote board: polled snapshots turned into synthetic trades.

A market-watch board lists, per symbol, the last price, the change, the day's open/high/low and
the *cumulative* day volume -- not individual trades. :class:`PsxBoard` compares consecutive
snapshots: when a symbol's cumulative volume has grown by ``dv`` since the previous poll, it emits
one **synthetic aggregate trade** of size ``dv`` at the board's last price, stamped with the poll
time, with ``count`` 1 (the number of real trades behind it is unknown) and no trade id. Bars
built from it have the true volume but only poll-time resolution, and their ``trades`` counts
polls with volume, not exchange trades.

Rules, per symbol, in the session's own time zone (:class:`SessionHours`; Asia/Karachi,
09:30-15:30 Monday-Friday by default):

- the first snapshot of a calendar day is the baseline: no trade (its volume traded at unknown
  times);
- outside session hours no trades are made; volume that appears there is counted in
  ``info["off_session_volume"]`` and folded into the baseline;
- a drop in cumulative volume is a *reset* when the baseline still comes from outside the session
  (a pre-open board showing yesterday's total, then zeroed at the open): the new total is
  traded. A drop during the session is a data error: one quarantine record (reason
  ``malformed``, the two totals in ``raw``) and the baseline stays at the higher total, so no
  volume is counted twice when the board recovers.

The board may be HTML (the first ``<table>`` with a header row) or JSON (a list of row objects,
or an object holding one under ``data``/``rows``/``board``); headers are matched loosely
(``CURRENT``/``last``/``price``, ``VOLUME``/``vol``, ...). When there is a sector column holding
PSX sector codes, :func:`read_sector_codes` maps them to names in the symbol metadata.

:class:`PsxFeed` polls the board (:class:`~flows.feeds.poller.PollingFeed`: 429
``Retry-After``, backoff on 5xx and timeouts, ``FAILED`` on other 4xx) and pushes the synthetic
trades into a flow; :func:`start_psx` wires it like the websocket venues.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dtime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from flows.feeds import FeedError
from flows.feeds.poller import PollingFeed
from flows.schema import REASONS, Quarantine, SymbolTable, TradeBatch

__all__ = ["DEFAULT_URL", "Board", "PsxBoard", "PsxFeed", "SessionHours", "read_board",
           "read_sector_codes", "start_psx"]

#: PSX's public market-watch page (an HTML table); pass another URL for a JSON endpoint.
DEFAULT_URL = "https://dps.psx.com.pk/market-watch"
#: Reason given to a decrease of cumulative volume during the session (REASONS has no closer one).
DECREASE_REASON = "malformed"

#: Board columns and the header names they go by (compared lowercased, alphanumerics and % only).
COLUMNS: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol", "sym", "ticker", "scrip"),
    "sector": ("sector", "sectorcode", "sectorname"),
    "last": ("current", "last", "lastprice", "price", "ltp", "close"),
    "change": ("change", "chg", "netchange"),
    "open": ("open",),
    "high": ("high",),
    "low": ("low",),
    "volume": ("volume", "vol", "cumvolume", "totalvolume"),
}
_NUMERIC = ("last", "change", "open", "high", "low", "volume")
_EMPTY = {"", "-", "--", "n/a", "na", "null", "none"}


def _key(header: str) -> str:
    return re.sub(r"[^a-z0-9%]", "", str(header).lower())


_LOOKUP = {alias: col for col, aliases in COLUMNS.items() for alias in aliases}


@dataclass(frozen=True)
class SessionHours:
    """When a market trades, in its own time zone.

    Parameters
    ----------
    tz : IANA time zone name.
    open, close : local session start (inclusive) and end (exclusive), ``"HH:MM"``.
    weekdays : trading weekdays, Monday = 0.
    holidays : local dates without a session.

    Examples
    --------
    >>> s = SessionHours()
    >>> s.in_session(1618897800 * 10**9)   # 2021-04-20 10:50 in Karachi, a Tuesday
    True
    >>> s.in_session(1618677810 * 10**9)   # Saturday
    False
    """

    tz: str = "Asia/Karachi"
    open: str = "09:30"
    close: str = "15:30"
    weekdays: tuple[int, ...] = (0, 1, 2, 3, 4)
    holidays: frozenset[date] = frozenset()
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _open: dtime = field(init=False, repr=False, compare=False)
    _close: dtime = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.tz))
        object.__setattr__(self, "_open", dtime.fromisoformat(self.open))
        object.__setattr__(self, "_close", dtime.fromisoformat(self.close))
        if self._open >= self._close:
            raise ValueError(f"session open {self.open} must be before close {self.close}")
        if any(d not in range(7) for d in self.weekdays):
            raise ValueError(f"weekdays are 0 (Monday) to 6, got {self.weekdays}")

    def local(self, t_ns: int) -> datetime:
        """Return ``t_ns`` (UTC ns) as a local datetime."""
        return datetime.fromtimestamp(t_ns // 10**9, tz=UTC).astimezone(self._zone)

    def in_session(self, t_ns: int) -> bool:
        """Return True when the market is open at ``t_ns``."""
        lt = self.local(t_ns)
        return (lt.weekday() in self.weekdays and lt.date() not in self.holidays
                and self._open <= lt.time() < self._close)


def read_sector_codes(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``sector_code,sector_name`` CSV (tests/data/psx_sector_codes_2021.csv).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    ...     _ = f.write("sector_code,sector_name\\n0807,COMMERCIAL BANKS\\n0804,CEMENT\\n")
    >>> read_sector_codes(f.name)["0807"]
    'COMMERCIAL BANKS'
    """
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return {row["sector_code"].strip(): row["sector_name"].strip()
                for row in csv.DictReader(fh) if row.get("sector_code")}


@dataclass
class Board:
    """One snapshot of the board: a row per symbol, plus the rows that could not be read.

    ``last``, ``change``, ``open``, ``high``, ``low``, ``volume`` are float64 (NaN where the
    board shows nothing); ``sector`` is empty text where there is no sector column; ``bad``
    holds ``(raw row, reason)`` pairs.
    """

    symbol: list[str]
    sector: list[str]
    last: np.ndarray
    change: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    volume: np.ndarray
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.symbol)


class _Tables(HTMLParser):
    """Collect the cells of every top-level HTML table as ``(is header row, cell texts)``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[tuple[bool, list[str]]]] = []
        self._depth = 0
        self._row: list[str] | None = None
        self._header = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self._depth += 1
            if self._depth == 1:
                self.tables.append([])
        elif self._depth == 1 and tag == "tr":
            self._close_row()
            self._row, self._header = [], False
        elif self._depth == 1 and tag in ("td", "th") and self._row is not None:
            self._close_cell()
            self._cell = []
            self._header = self._header or tag == "th"

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._depth:
            if self._depth == 1:
                self._close_row()
            self._depth -= 1
        elif self._depth == 1 and tag in ("td", "th"):
            self._close_cell()
        elif self._depth == 1 and tag == "tr":
            self._close_row()

    def handle_data(self, data: str) -> None:
        if self._cell is not None and self._depth == 1:
            self._cell.append(data)

    def _close_cell(self) -> None:
        if self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
        self._cell = None

    def _close_row(self) -> None:
        self._close_cell()
        if self._row and self.tables:
            self.tables[-1].append((self._header, self._row))
        self._row = None


def _html_rows(text: str) -> list[dict[str, Any]]:
    """Return the rows of the first table whose header row names a symbol column."""
    parser = _Tables()
    parser.feed(text)
    parser.close()
    for table in parser.tables:
        header = next((cells for _, cells in table
                       if any(_LOOKUP.get(_key(c)) == "symbol" for c in cells)), None)
        if header is not None:
            start = next(i for i, (_, cells) in enumerate(table) if cells is header)
            return [dict(zip(header, cells)) for is_header, cells in table[start + 1:]
                    if not is_header]
    raise ValueError("no table with a symbol column")


def _json_rows(text: str) -> list[Any]:
    obj = json.loads(text)
    if isinstance(obj, dict):
        for k in ("data", "rows", "board", "symbols"):
            if isinstance(obj.get(k), list):
                return obj[k]
        raise ValueError("JSON board has no data/rows/board list")
    if not isinstance(obj, list):
        raise TypeError("JSON board is not a list of rows")
    return obj


def _value(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError("boolean where a number belongs")
    if v is None:
        return math.nan
    if isinstance(v, (int, float)):
        return float(v)
    if not isinstance(v, str):
        raise TypeError(f"expected a number, got {type(v).__name__}")
    s = v.strip().replace(",", "").rstrip("%")
    if s.lower() in _EMPTY:
        return math.nan
    if s.startswith("(") and s.endswith(")"):  # accounting notation for negatives
        s = "-" + s[1:-1]
    return float(s)


def read_board(payload: str | bytes) -> Board:
    """Parse a board snapshot, HTML or JSON (sniffed from the first character).

    Raises ValueError (TypeError for JSON of the wrong shape) when the payload holds no board
    at all (no table, no symbol column);
    rows that cannot be read are kept in ``Board.bad``.

    Examples
    --------
    >>> b = read_board('<table><tr><th>SYMBOL</th><th>CURRENT</th><th>VOLUME</th></tr>'
    ...                '<tr><td><a>HBL</a></td><td>151.20</td><td>1,204,500</td></tr></table>')
    >>> b.symbol, b.last.tolist(), b.volume.tolist()
    (['HBL'], [151.2], [1204500.0])
    >>> read_board('[{"symbol": "HBL", "current": 151.2, "volume": 1204500}]').volume.tolist()
    [1204500.0]
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = bytes(payload).decode("utf-8", "replace")
    text = payload.lstrip("\ufeff \t\r\n")
    rows = _json_rows(text) if text[:1] in "[{" else _html_rows(text)
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    bad: list[tuple[str, str]] = []
    seen_symbol = False
    for row in rows:
        raw = json.dumps(row, default=str) if not isinstance(row, str) else row
        if not isinstance(row, dict):
            bad.append((raw, "malformed"))
            continue
        named = {}
        for k, v in row.items():
            col = _LOOKUP.get(_key(k))
            if col is not None and col not in named:
                named[col] = v
        seen_symbol = seen_symbol or "symbol" in named
        sym = named.get("symbol")
        if not isinstance(sym, str) or not sym.strip() or "volume" not in named:
            bad.append((raw, "missing_field"))
            continue
        try:
            values = {c: _value(named.get(c)) for c in _NUMERIC}
        except (TypeError, ValueError, OverflowError):
            bad.append((raw, "malformed"))
            continue
        cols["symbol"].append(sym.strip())
        sector = named.get("sector")
        cols["sector"].append("" if sector is None else str(sector).strip())
        for c in _NUMERIC:
            cols[c].append(values[c])
    if rows and not seen_symbol:
        raise ValueError("board has no symbol column")
    return Board(cols["symbol"], cols["sector"],
                 *(np.asarray(cols[c], dtype=np.float64) for c in _NUMERIC), bad=bad)


class PsxBoard:
    """Turn consecutive board snapshots into synthetic trades (module doc for the rules).

    Parameters
    ----------
    symbols : the flow's symbol table; sector names (when known) go to ``symbols.meta``.
    session : trading hours; PSX's by default.
    sectors : sector code -> name (:func:`read_sector_codes`), for boards with a sector column.
    exchange : recorded in the symbol metadata.

    :meth:`parse` (the poller's callback) returns ``(trades, quarantine, info)`` with ``info``:
    ``rows`` (symbols on the board), ``in_session``, ``baseline`` (symbols seen for the first
    time that day), ``resets``, ``off_session_volume``, ``no_volume`` (rows without a volume).

    Examples
    --------
    >>> from flows.schema import NS
    >>> board = PsxBoard(SymbolTable())
    >>> t0 = 1618897800 * NS                      # Tuesday 2021-04-20 10:50 Asia/Karachi
    >>> page = '[{{"symbol": "HBL", "current": {p}, "volume": {v}}}]'
    >>> len(board.parse(page.format(p=151.2, v=1000), t0)[0])   # baseline
    0
    >>> trades, _, _ = board.parse(page.format(p=151.5, v=1600), t0 + 5 * NS)
    >>> trades.size.tolist(), trades.price.tolist(), trades.count.tolist()
    ([600.0], [151.5], [1])
    """

    def __init__(self, symbols: SymbolTable, session: SessionHours | None = None,
                 sectors: dict[str, str] | None = None, exchange: str = "PSX"):
        self.symbols = symbols
        self.session = session or SessionHours()
        self.sectors = dict(sectors or {})
        self.exchange = exchange
        # Per symbol code: day of the baseline (proleptic ordinal, 0 = none), cumulative
        # volume, and whether that volume was taken outside the session.
        self._day = np.zeros(0, dtype=np.int64)
        self._volume = np.zeros(0, dtype=np.float64)
        self._off = np.zeros(0, dtype=bool)

    def _grow(self, n: int) -> None:
        if n > len(self._day):
            size = max(n, 2 * len(self._day))
            for name, fill in (("_day", 0), ("_volume", 0.0), ("_off", False)):
                old = getattr(self, name)
                new = np.full(size, fill, dtype=old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)

    def parse(self, payload: str | bytes, recv_ns: int
              ) -> tuple[TradeBatch, Quarantine, dict[str, Any]]:
        """Read one polled board and return the trades it implies since the previous poll."""
        try:
            board = read_board(payload)
        except (ValueError, TypeError, RecursionError) as exc:
            raw = payload.decode("utf-8", "replace") if isinstance(payload, (bytes, bytearray)) \
                else str(payload)
            return TradeBatch(), Quarantine.malformed([raw]), {"error": f"unreadable board: {exc}"}
        return self.update(board, recv_ns)

    __call__ = parse

    def update(self, board: Board, poll_ns: int
               ) -> tuple[TradeBatch, Quarantine, dict[str, Any]]:
        """Fold one snapshot taken at ``poll_ns`` (UTC ns) into the baselines."""
        bad = Quarantine.concat([Quarantine.malformed([raw], why) for raw, why in board.bad])
        in_session = self.session.in_session(poll_ns)
        info: dict[str, Any] = {"rows": len(board), "in_session": in_session, "baseline": 0,
                                "resets": 0, "off_session_volume": 0.0, "no_volume": 0}
        if not len(board):
            return TradeBatch(), bad, info
        self._note_sectors(board)
        codes = self.symbols.codes(board.symbol)
        self._grow(len(self.symbols))
        day = self.session.local(poll_ns).date().toordinal()
        vol = board.volume
        usable = np.isfinite(vol)
        info["no_volume"] = int((~usable).sum())
        prev = self._volume[codes]
        first = usable & (self._day[codes] != day)
        same = usable & ~first
        dv = np.where(same, vol - prev, 0.0)
        info["baseline"] = int(first.sum())
        trade_size = np.zeros(len(board))
        dec = np.zeros(len(board), dtype=bool)
        if in_session:
            grew = same & (dv > 0)
            reset = same & (dv < 0) & self._off[codes]
            dec = same & (dv < 0) & ~self._off[codes]
            trade_size[grew] = dv[grew]
            trade_size[reset] = vol[reset]
            info["resets"] = int(reset.sum())
            take = first | grew | reset
            self._off[codes[take]] = False
        else:
            info["off_session_volume"] = float(dv[dv > 0].sum())
            take = first | (same & (dv != 0))
            self._off[codes[take]] = True
        self._day[codes[take]] = day
        self._volume[codes[take]] = vol[take]
        traded = np.flatnonzero(trade_size > 0)
        trades = TradeBatch(
            time=np.full(len(traded), poll_ns, dtype=np.int64), symbol=codes[traded],
            price=board.last[traded], size=trade_size[traded],
            trade_id=np.full(len(traded), -1, dtype=np.int64),
            side=np.zeros(len(traded), dtype=np.int8),
            recv_time=np.full(len(traded), poll_ns, dtype=np.int64))
        if dec.any():
            idx = np.flatnonzero(dec)
            drops = Quarantine(
                time=np.full(len(idx), poll_ns, dtype=np.int64), symbol=codes[idx],
                price=board.last[idx], size=dv[idx], trade_id=np.full(len(idx), -1, np.int64),
                reason=np.full(len(idx), REASONS.index(DECREASE_REASON), dtype=np.int8),
                raw=[f"{board.symbol[i]}: cumulative volume decreased from {prev[i]:.0f} to "
                     f"{vol[i]:.0f}" for i in idx])
            bad = Quarantine.concat([bad, drops])
        return trades, bad, info

    def _note_sectors(self, board: Board) -> None:
        meta = self.symbols.meta
        for sym, code in zip(board.symbol, board.sector):
            if sym in meta and meta[sym].get("sector_code", "") == code:
                continue
            name = self.sectors.get(code) or self.sectors.get(code.zfill(4)) or code
            entry = dict(meta.get(sym, {}), exchange=self.exchange)
            if code:
                entry.update(sector=name, sector_code=code)
            meta[sym] = entry



class PsxFeed(PollingFeed):
    """The PSX board polled every ``interval_s`` into ``sink`` as synthetic trades.

    Parameters
    ----------
    table : the flow's symbol table (sector names land in ``table.meta``).
    sink : ``sink(batch, unparsed)``, e.g. ``flow.push``.
    url : the board; default :data:`DEFAULT_URL` (HTML), or any JSON board.
    interval_s : seconds between polls.
    session, sectors : see :class:`PsxBoard`.
    **kwargs : :class:`~flows.feeds.poller.PollingFeed` options (``name``, ``on_state``,
        ``max_failures``, ``fetch``, ``wall_ns``, ...).

    The trades carry no id, so the health shows no gaps; their lag is zero (they are stamped
    with the poll time).

    Examples
    --------
    >>> from flows.feeds.poller import Response
    >>> page = '[{{"symbol": "HBL", "current": {p}, "volume": {v}}}]'
    >>> replies = iter([Response(200, body=page.format(p=151.2, v=1000).encode()),
    ...                 Response(200, body=page.format(p=151.5, v=1600).encode()), Response(403)])
    >>> got = []
    >>> feed = PsxFeed(SymbolTable(), lambda b, q: got.append((b.size.tolist(), b.price.tolist())),
    ...                interval_s=0.01, fetch=lambda url, timeout, headers: next(replies),
    ...                wall_ns=lambda: 1618897800 * 10**9)   # a Tuesday, 10:50 in Karachi
    >>> feed.start().join(5)
    >>> got, feed.failure
    ([([600.0], [151.5])], 'HTTP 403 from https://dps.psx.com.pk/market-watch')
    """

    name = "psx"

    def __init__(self, table: SymbolTable, sink, *, url: str = DEFAULT_URL,
                 interval_s: float = 5.0, session: SessionHours | None = None,
                 sectors: dict[str, str] | None = None, **kwargs):
        self.board = PsxBoard(table, session, sectors)
        super().__init__(url, self.board.parse, sink, interval_s=interval_s, **kwargs)


def start_psx(flow, *, url: str = DEFAULT_URL, interval_s: float = 5.0,
              session: SessionHours | None = None,
              sectors: dict[str, str] | str | os.PathLike | None = None, **kwargs) -> PsxFeed:
    """Poll the PSX board into ``flow``; return the started :class:`PsxFeed`.

    ``sectors`` is a code -> name mapping or a path to a sector-code CSV
    (:func:`read_sector_codes`). The feed's state drives ``flow.feed_state``, its health is
    registered with ``flow.register_feed``, trades are pushed as feed ``psx``, and the flow's
    flusher persists. Stop with ``feed.stop()``.
    """
    if isinstance(sectors, (str, os.PathLike)):
        try:
            sectors = read_sector_codes(sectors)
        except (OSError, UnicodeDecodeError, KeyError, csv.Error) as exc:
            raise FeedError(f"psx: cannot read sector codes from {sectors}: {exc}") from None
    name = kwargs.setdefault("name", PsxFeed.name)

    def on_state(state: str) -> None:
        flow.feed_state = state

    def sink(batch: TradeBatch, unparsed: Quarantine) -> None:
        flow.push(batch, unparsed, feed=name)

    feed = PsxFeed(flow.table, sink, url=url, interval_s=interval_s, session=session,
                   sectors=sectors, on_state=on_state, **kwargs)
    flow.register_feed(name, feed.health)
    flow.start_flusher()
    return feed.start()
