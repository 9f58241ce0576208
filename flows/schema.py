"""Shared vocabulary of the flow: the trade batch, the symbol table, timeframes and store names.

Every stage consumes and emits :class:`TradeBatch` objects -- columnar numpy arrays -- never
single trades. Event times are ``int64`` nanoseconds since the Unix epoch, UTC.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

#: Nanoseconds in one second.
NS = 1_000_000_000

#: Supported bar timeframes and their length in nanoseconds (1d is aligned to UTC midnight).
TIMEFRAMES: dict[str, int] = {
    "1m": 60 * NS,
    "5m": 5 * 60 * NS,
    "15m": 15 * 60 * NS,
    "1h": 3600 * NS,
    "4h": 4 * 3600 * NS,
    "1d": 86400 * NS,
}

#: Bar variables in the store, in contract order, with dtypes.
BAR_FIELDS: dict[str, str] = {
    "open": "float64",
    "high": "float64",
    "low": "float64",
    "close": "float64",
    "volume": "float64",
    "trades": "int64",
    "vwap": "float64",
}

BAR_ATTRS: dict[str, dict[str, str]] = {
    "open": {"long_name": "first trade price in the bar", "units": "quote currency"},
    "high": {"long_name": "highest trade price in the bar", "units": "quote currency"},
    "low": {"long_name": "lowest trade price in the bar", "units": "quote currency"},
    "close": {"long_name": "last trade price in the bar", "units": "quote currency"},
    "volume": {"long_name": "sum of trade sizes", "units": "base units"},
    "trades": {"long_name": "number of trades"},
    "vwap": {"long_name": "volume-weighted average price", "units": "quote currency"},
}

#: Side codes in :attr:`TradeBatch.side`.
BUY, SELL, UNKNOWN_SIDE = 1, -1, 0
#: ``trade_id`` value meaning "the venue gave none".
NO_ID = -1

#: Quarantine reasons, in a fixed order (their index is stored with each record).
REASONS: tuple[str, ...] = (
    "non_finite_price",
    "non_positive_price",
    "non_finite_size",
    "non_positive_size",
    "bad_time",
    "future_time",
    "too_late",
    "unknown_symbol",
    "malformed",
    "missing_field",
    "bad_ohlc",
    "spike",
)


def parse_timeframes(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Return the timeframes named in ``spec`` (``"1m,1h"`` or a list), in canonical order.

    Examples
    --------
    >>> parse_timeframes("1h,1m")
    ('1m', '1h')
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in TIMEFRAMES]
    if unknown:
        raise ValueError(f"unknown timeframe {unknown[0]!r}; choose from {', '.join(TIMEFRAMES)}")
    if not names:
        raise ValueError("no timeframe given")
    if "1m" not in names:
        names.append("1m")  # every timeframe is rolled up from the 1m core
    return tuple(tf for tf in TIMEFRAMES if tf in names)


class SymbolTable:
    """Map symbol names to dense integer codes, shared by every stage of one flow.

    Codes are assigned in order of first appearance and never change, so arrays indexed by
    code only ever grow. Thread-safe.

    Examples
    --------
    >>> table = SymbolTable(["AAPL"])
    >>> table.codes(["MSFT", "AAPL", "MSFT"]).tolist()
    [1, 0, 1]
    >>> table.names
    ('AAPL', 'MSFT')
    """

    def __init__(self, names: Iterable[str] = (), meta: dict[str, dict[str, str]] | None = None):
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._lock = threading.Lock()
        #: Per-symbol metadata such as ``{"sector": ..., "name": ..., "exchange": ...}``.
        self.meta: dict[str, dict[str, str]] = dict(meta or {})
        self.codes(list(names))

    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    def lookup(self, name: str) -> int | None:
        """Return the code of ``name``, or None when it is not in the table."""
        return self._index.get(name)

    def code(self, name: str) -> int:
        """Return the code of ``name``, adding it when new."""
        code = self._index.get(name)
        if code is None:
            with self._lock:
                code = self._index.get(name)
                if code is None:
                    code = self._index[name] = len(self._names)
                    self._names.append(name)
        return code

    def codes(self, names: Sequence[str] | np.ndarray) -> np.ndarray:
        """Return the codes of ``names`` as ``int32``, adding new names in order of appearance."""
        arr = np.asarray(names, dtype=object)
        if arr.size == 0:
            return np.empty(0, dtype=np.int32)
        uniq, inverse = np.unique(arr.astype(str), return_inverse=True)
        # Assign new codes in order of first appearance, not alphabetical order.
        first = np.full(len(uniq), len(arr), dtype=np.int64)
        np.minimum.at(first, inverse, np.arange(len(arr)))
        ucodes = np.empty(len(uniq), dtype=np.int32)
        for i in np.argsort(first, kind="stable"):
            ucodes[i] = self.code(str(uniq[i]))
        return ucodes[inverse]


def _empty(dtype: str) -> np.ndarray:
    return np.empty(0, dtype=dtype)


@dataclass(frozen=True)
class TradeBatch:
    """A batch of trades as parallel numpy arrays (one websocket frame, one poll, N ms of replay).

    Parameters
    ----------
    time : int64 ns since the epoch (UTC), the exchange's event time.
    symbol : int32 codes into the flow's :class:`SymbolTable`.
    price, size : float64.
    trade_id : int64, unique per symbol; ``NO_ID`` (-1) where the venue gives none.
    side : int8 aggressor side, ``BUY`` (1), ``SELL`` (-1) or ``UNKNOWN_SIDE`` (0).
    recv_time : int64 ns, when the batch was received (0 where unknown).
    count : int32 number of exchange trades each row stands for -- 1 for a plain trade, more
        for an aggregated record such as Binance's aggTrade (``l - f + 1``). Bars count these.

    Examples
    --------
    >>> table = SymbolTable()
    >>> b = TradeBatch.from_columns(table, time=[0, NS], symbol=["X", "Y"], price=[1.0, 2.0],
    ...                             size=[5, 1])
    >>> len(b), b.symbol.tolist(), b.trade_id.tolist()
    (2, [0, 1], [-1, -1])
    """

    time: np.ndarray = field(default_factory=lambda: _empty("int64"))
    symbol: np.ndarray = field(default_factory=lambda: _empty("int32"))
    price: np.ndarray = field(default_factory=lambda: _empty("float64"))
    size: np.ndarray = field(default_factory=lambda: _empty("float64"))
    trade_id: np.ndarray = field(default_factory=lambda: _empty("int64"))
    side: np.ndarray = field(default_factory=lambda: _empty("int8"))
    recv_time: np.ndarray = field(default_factory=lambda: _empty("int64"))
    count: np.ndarray | None = None

    COLUMNS = ("time", "symbol", "price", "size", "trade_id", "side", "recv_time", "count")
    DTYPES = ("int64", "int32", "float64", "float64", "int64", "int8", "int64", "int32")

    def __post_init__(self) -> None:
        n = len(self.time)
        if self.count is None:
            object.__setattr__(self, "count", np.ones(n, dtype=np.int32))
        for name, dtype in zip(self.COLUMNS, self.DTYPES):
            arr = getattr(self, name)
            if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
                raise TypeError(f"TradeBatch.{name} must be a 1-d {dtype} array, got {arr.dtype}")
            if len(arr) != n:
                raise ValueError(f"TradeBatch.{name} has {len(arr)} rows, time has {n}")

    def __len__(self) -> int:
        return len(self.time)

    @classmethod
    def from_columns(
        cls,
        symbols: SymbolTable,
        *,
        time: Sequence[int] | np.ndarray,
        symbol: Sequence[str] | np.ndarray,
        price: Sequence[float] | np.ndarray,
        size: Sequence[float] | np.ndarray,
        trade_id: Sequence[int] | np.ndarray | None = None,
        side: Sequence[int] | np.ndarray | None = None,
        recv_time: Sequence[int] | np.ndarray | int | None = None,
        count: Sequence[int] | np.ndarray | None = None,
    ) -> "TradeBatch":
        """Build a batch from columns; ``symbol`` holds names, coded through ``symbols``."""
        t = np.asarray(time, dtype=np.int64)
        n = len(t)
        if recv_time is None:
            recv = np.zeros(n, dtype=np.int64)
        elif np.isscalar(recv_time):
            recv = np.full(n, recv_time, dtype=np.int64)
        else:
            recv = np.asarray(recv_time, dtype=np.int64)
        return cls(
            time=t,
            symbol=symbols.codes(symbol),
            price=np.asarray(price, dtype=np.float64),
            size=np.asarray(size, dtype=np.float64),
            trade_id=(np.full(n, NO_ID, dtype=np.int64) if trade_id is None
                      else np.asarray(trade_id, dtype=np.int64)),
            side=(np.zeros(n, dtype=np.int8) if side is None else np.asarray(side, dtype=np.int8)),
            recv_time=recv,
            count=None if count is None else np.asarray(count, dtype=np.int32),
        )

    def take(self, index: np.ndarray) -> "TradeBatch":
        """Return the rows selected by a boolean mask or an integer index."""
        return TradeBatch(*(getattr(self, c)[index] for c in self.COLUMNS))

    @classmethod
    def concat(cls, batches: Sequence["TradeBatch"]) -> "TradeBatch":
        """Concatenate batches in order."""
        if not batches:
            return cls()
        return cls(*(np.concatenate([getattr(b, c) for b in batches]) for c in cls.COLUMNS))

    def to_frame(self, symbols: SymbolTable | None = None):
        """Return the batch as a pandas DataFrame (symbol names when ``symbols`` is given)."""
        import pandas as pd

        data = {c: getattr(self, c) for c in self.COLUMNS}
        data["time"] = self.time.view("datetime64[ns]")
        if symbols is not None:
            names = np.asarray(symbols.names, dtype=object)
            data["symbol"] = names[self.symbol] if len(names) else self.symbol.astype(object)
        return pd.DataFrame(data)


@dataclass(frozen=True)
class BarBatch:
    """Ready-made OHLCV bars of one timeframe (a daily file, a venue's minute bars).

    ``time`` is each bar's open time (int64 ns UTC); ``trades`` is the venue's trade count
    (0 where unknown: such a bar then counts as one trade, so it is not an empty bar); ``vwap``
    is NaN where unknown.
    """

    time: np.ndarray
    symbol: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    trades: np.ndarray
    vwap: np.ndarray

    COLUMNS = ("time", "symbol", "open", "high", "low", "close", "volume", "trades", "vwap")

    def __len__(self) -> int:
        return len(self.time)

    @classmethod
    def from_columns(cls, symbols: SymbolTable, *, time, symbol, open, high, low, close, volume,
                     trades=None, vwap=None) -> "BarBatch":
        t = np.asarray(time, dtype=np.int64)
        n = len(t)
        return cls(t, symbols.codes(symbol), *(np.asarray(x, dtype=np.float64) for x in (open, high, low, close, volume)),
                   np.zeros(n, np.int64) if trades is None else np.asarray(trades, dtype=np.int64),
                   np.full(n, np.nan) if vwap is None else np.asarray(vwap, dtype=np.float64))

    def take(self, index: np.ndarray) -> "BarBatch":
        return BarBatch(*(getattr(self, c)[index] for c in self.COLUMNS))


@dataclass
class Quarantine:
    """Rejected trades with a reason each; ``raw`` keeps the payload when there is one.

    Columns follow :class:`TradeBatch`, plus ``reason`` (index into :data:`REASONS`) and ``raw``.
    """

    time: np.ndarray = field(default_factory=lambda: _empty("int64"))
    symbol: np.ndarray = field(default_factory=lambda: _empty("int32"))
    price: np.ndarray = field(default_factory=lambda: _empty("float64"))
    size: np.ndarray = field(default_factory=lambda: _empty("float64"))
    trade_id: np.ndarray = field(default_factory=lambda: _empty("int64"))
    reason: np.ndarray = field(default_factory=lambda: _empty("int8"))
    raw: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reason)

    @classmethod
    def from_batch(cls, batch: TradeBatch, reason: np.ndarray) -> "Quarantine":
        return cls(batch.time, batch.symbol, batch.price, batch.size, batch.trade_id,
                   np.asarray(reason, dtype=np.int8), [""] * len(batch))

    @classmethod
    def from_bars(cls, bars: "BarBatch", reason: np.ndarray) -> "Quarantine":
        n = len(bars)
        return cls(bars.time, bars.symbol, bars.close, bars.volume, np.full(n, NO_ID, np.int64),
                   np.asarray(reason, dtype=np.int8), [""] * n)

    @classmethod
    def malformed(cls, raws: Sequence[str], reason: str = "malformed") -> "Quarantine":
        """Records for payloads that could not be parsed into a trade at all."""
        n = len(raws)
        return cls(np.zeros(n, np.int64), np.full(n, -1, np.int32), np.full(n, np.nan),
                   np.full(n, np.nan), np.full(n, NO_ID, np.int64),
                   np.full(n, REASONS.index(reason), np.int8), [str(r)[:500] for r in raws])

    @classmethod
    def concat(cls, parts: Sequence["Quarantine"]) -> "Quarantine":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        names = ("time", "symbol", "price", "size", "trade_id", "reason")
        cols = {n: np.concatenate([getattr(p, n) for p in parts]) for n in names}
        return cls(**cols, raw=[r for p in parts for r in p.raw])

    def counts(self) -> dict[str, int]:
        """Return the number of records per reason name."""
        c = np.bincount(self.reason.astype(np.int64), minlength=len(REASONS))
        return {REASONS[i]: int(c[i]) for i in range(len(REASONS)) if c[i]}
