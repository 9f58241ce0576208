"""What the dashboards read: the :class:`BarSource` protocol and an in-memory implementation.

The flow (``flows.pipeline``) implements :class:`BarSource`; dashboards use nothing else of it.
:class:`FrameSource` holds bars in pandas DataFrames, for tests, notebooks and demos; its
``upsert`` and ``simulate`` mimic a live flow (the forming bar changes in place, new bars are
appended).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from flows.schema import BAR_FIELDS, TIMEFRAMES

log = logging.getLogger(__name__)

#: Bar columns in contract order (``trades`` is int64, the rest float64).
BAR_COLUMNS: tuple[str, ...] = tuple(BAR_FIELDS)


@runtime_checkable
class BarSource(Protocol):
    """Read access to live OHLCV bars: the only thing a dashboard knows about a flow.

    All methods must be safe to call from the dashboard server's thread while the flow writes.
    """

    def symbols(self) -> list[str]:
        """Return the known symbols, in a stable order."""

    def meta(self, symbol: str) -> dict:
        """Return ``{"sector", "name", "exchange"}`` for ``symbol`` (any key may be missing)."""

    def timeframes(self) -> tuple[str, ...]:
        """Return the timeframes kept, a subset of ``1m 5m 15m 1h 4h 1d`` in that order."""

    def bars(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        """Return the last ``n`` bars (all when ``None``) in which ``symbol`` traded.

        The index is ``time`` (``datetime64[ns]``, UTC, bar open time); the columns are
        ``open high low close volume trades vwap`` (float64, ``trades`` int64). The last row may
        be the forming bar, which changes in place; new bars appear at the end. A symbol
        without bars gives an empty frame with those columns.
        """

    def version(self) -> int:
        """Return a counter that increases whenever any bar changes (cheap to call)."""

    def status(self) -> dict:
        """Return at least ``feed``, ``state`` (str) and ``received``, ``accepted``,
        ``quarantined``, ``duplicates`` (int)."""


def empty_bars() -> pd.DataFrame:
    """Return an empty bar frame with the contract's index, columns and dtypes."""
    index = pd.DatetimeIndex(np.empty(0, "datetime64[ns]"), name="time")
    return pd.DataFrame({c: np.empty(0, BAR_FIELDS[c]) for c in BAR_COLUMNS}, index=index)


def _normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` (index or column ``time``) in the contract's shape, sorted by time."""
    if "time" in frame.columns:
        frame = frame.set_index("time")
    out = frame.loc[:, list(BAR_COLUMNS)].astype(BAR_FIELDS)
    out.index = pd.DatetimeIndex(out.index, name="time").astype("datetime64[ns]")
    return out[~out.index.duplicated(keep="last")].sort_index()


class FrameSource:
    """An in-memory :class:`BarSource` over pandas DataFrames.

    Parameters
    ----------
    frames : mapping of timeframe to DataFrame
        Bars in long form: a ``time`` index (or column), a ``symbol`` column and the bar
        columns. Timeframes are kept in canonical order.
    meta : mapping of symbol to dict, optional
        Symbol metadata (``sector``, ``name``, ``exchange``).
    symbols : sequence of str, optional
        Symbols to list, including ones without bars yet; default: those in ``frames``.
    feed : str
        Name reported by :meth:`status`.

    Examples
    --------
    >>> t = pd.to_datetime(["2024-01-02 09:30", "2024-01-02 09:31"])
    >>> df = pd.DataFrame({"time": t, "symbol": "X", "open": [1.0, 2.0], "high": [2.0, 3.0],
    ...                    "low": [1.0, 2.0], "close": [2.0, 2.5], "volume": [10.0, 5.0],
    ...                    "trades": [3, 2], "vwap": [1.5, 2.2]})
    >>> src = FrameSource({"1m": df})
    >>> src.bars("1m", "X", n=1)["close"].tolist()
    [2.5]
    >>> v = src.version()
    >>> src.upsert("1m", "X", df.iloc[[1]].assign(close=2.7))
    >>> src.version() > v, src.bars("1m", "X")["close"].tolist()
    (True, [2.0, 2.7])
    """

    def __init__(
        self,
        frames: Mapping[str, pd.DataFrame],
        meta: Mapping[str, dict] | None = None,
        symbols: Sequence[str] | None = None,
        feed: str = "frames",
    ):
        unknown = [tf for tf in frames if tf not in TIMEFRAMES]
        if unknown:
            raise ValueError(f"unknown timeframe {unknown[0]!r}")
        self._lock = threading.Lock()
        self._bars: dict[str, dict[str, pd.DataFrame]] = {}
        for tf, frame in frames.items():
            self._bars[tf] = {
                str(sym): _normalize(part) for sym, part in frame.groupby("symbol", sort=False)
            }
        names = list(symbols) if symbols is not None else []
        for per_symbol in self._bars.values():
            names += [s for s in per_symbol if s not in names]
        self._symbols = names
        self._meta = {k: dict(v) for k, v in (meta or {}).items()}
        self._version = 0
        self._status = {"feed": feed, "state": "LIVE", "received": 0, "accepted": 0,
                        "quarantined": 0, "duplicates": 0}

    def symbols(self) -> list[str]:
        with self._lock:
            return list(self._symbols)

    def meta(self, symbol: str) -> dict:
        return dict(self._meta.get(symbol, {}))

    def timeframes(self) -> tuple[str, ...]:
        return tuple(tf for tf in TIMEFRAMES if tf in self._bars)

    def bars(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        with self._lock:
            frame = self._bars.get(tf, {}).get(symbol)
            if frame is None:
                return empty_bars()
            return (frame if n is None else frame.iloc[-n:] if n > 0 else frame.iloc[:0]).copy()

    def version(self) -> int:
        return self._version

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def set_status(self, **fields: object) -> None:
        """Update the fields reported by :meth:`status` (e.g. ``state="STALE"``)."""
        with self._lock:
            self._status.update(fields)

    def upsert(self, tf: str, symbol: str, rows: pd.DataFrame) -> None:
        """Insert or replace bars of ``symbol`` by time (the forming bar is replaced in place).

        ``rows`` has a ``time`` index or column and the bar columns.
        """
        if tf not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {tf!r}")
        new = _normalize(rows)
        with self._lock:
            per_symbol = self._bars.setdefault(tf, {})
            old = per_symbol.get(symbol)
            if old is None or old.empty:
                per_symbol[symbol] = new
            elif new.index.min() > old.index.max():
                per_symbol[symbol] = pd.concat([old, new])
            else:
                both = pd.concat([old, new])
                per_symbol[symbol] = both[~both.index.duplicated(keep="last")].sort_index()
            if symbol not in self._symbols:
                self._symbols.append(symbol)
            self._status["received"] += len(new)
            self._status["accepted"] += len(new)
            self._version += 1

    def append(self, tf: str, symbol: str, rows: pd.DataFrame) -> None:
        """Add bars of ``symbol`` that are newer than its last one."""
        last = self.bars(tf, symbol, n=1)
        first = _normalize(rows).index.min() if len(rows) else None
        if len(last) and first is not None and first <= last.index[-1]:
            raise ValueError(f"append: {first} is not after the last bar {last.index[-1]}")
        self.upsert(tf, symbol, rows)

    @classmethod
    def synthetic(
        cls,
        symbols: int | Sequence[str] = 8,
        n_bars: int = 300,
        timeframes: Sequence[str] = ("1m", "5m"),
        seed: int = 0,
        end: str | pd.Timestamp = "2024-01-02 16:00",
        empty: Sequence[str] = (),
    ) -> FrameSource:
        """Return a source with seeded random-walk bars (``empty`` symbols are listed, bar-less).

        Examples
        --------
        >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=5, empty=["NEW"])
        >>> src.symbols(), len(src.bars("5m", "BBB")), len(src.bars("1m", "NEW"))
        (['AAA', 'BBB', 'NEW'], 5, 0)
        """
        names = ([f"SYM{i:02d}" for i in range(symbols)] if isinstance(symbols, int)
                 else list(symbols))
        rng = np.random.default_rng(seed)
        sectors = ("Technology", "Energy", "Financials", "Health Care")
        end_ns = pd.Timestamp(end).value
        frames = {}
        for tf in timeframes:
            step = TIMEFRAMES[tf]
            opens = (end_ns // step) * step - step * np.arange(n_bars)[::-1]
            times = opens.view("datetime64[ns]")
            parts = []
            for i, sym in enumerate(names):
                close = (10.0 * (i + 1)) * np.exp(np.cumsum(rng.normal(0, 0.004, n_bars)))
                open_ = np.r_[close[0], close[:-1]]
                spread = np.abs(rng.normal(0, 0.002, n_bars)) * close
                volume = rng.integers(100, 5000, n_bars).astype("float64")
                parts.append(pd.DataFrame({
                    "time": times, "symbol": sym, "open": open_,
                    "high": np.maximum(open_, close) + spread,
                    "low": np.minimum(open_, close) - spread,
                    "close": close, "volume": volume, "trades": rng.integers(1, 80, n_bars),
                    "vwap": (open_ + close) / 2,
                }))
            frames[tf] = pd.concat(parts, ignore_index=True)
        meta = {s: {"sector": sectors[i % len(sectors)], "name": f"{s} Corp", "exchange": "SIM"}
                for i, s in enumerate(names)}
        return cls(frames, meta=meta, symbols=names + [s for s in empty if s not in names],
                   feed="synthetic")

    def tick(self, rng: np.random.Generator, new_bar: bool = False) -> None:
        """Move every symbol's last bar by one random trade; with ``new_bar``, open a new bar.

        Bars advance in simulated time (one timeframe per new bar), so a demo shows new bars
        every few ticks instead of once a minute.
        """
        for tf in self.timeframes():
            for sym in self.symbols():
                last = self.bars(tf, sym, n=1)
                if last.empty:
                    continue
                bar = last.iloc[-1]
                price = float(bar["close"]) * float(np.exp(rng.normal(0, 0.002)))
                size = float(rng.integers(1, 200))
                if new_bar:
                    time = last.index[-1] + pd.Timedelta(TIMEFRAMES[tf], "ns")
                    row = {"open": price, "high": price, "low": price, "close": price,
                           "volume": size, "trades": 1, "vwap": price}
                else:
                    time = last.index[-1]
                    volume = float(bar["volume"]) + size
                    row = {"open": float(bar["open"]), "high": max(float(bar["high"]), price),
                           "low": min(float(bar["low"]), price), "close": price,
                           "volume": volume, "trades": int(bar["trades"]) + 1,
                           "vwap": (float(bar["vwap"]) * float(bar["volume"]) + price * size)
                           / volume}
                self.upsert(tf, sym, pd.DataFrame(row, index=pd.DatetimeIndex([time], name="time")))

    def simulate(self, period: float = 0.3, bar_every: int = 4, seed: int = 0) -> threading.Event:
        """Tick every ``period`` seconds in a daemon thread, opening a new bar every
        ``bar_every`` ticks; set the returned event to stop."""
        stop = threading.Event()
        rng = np.random.default_rng(seed)

        def run() -> None:
            count = 0
            while not stop.wait(period):
                count += 1
                self.tick(rng, new_bar=count % bar_every == 0)

        threading.Thread(target=run, name="frame-source-simulate", daemon=True).start()
        return stop


_default: BarSource | None = None
_default_lock = threading.Lock()


def default_source() -> BarSource:
    """Return the process-wide source for ``panel serve dashboards/app.py`` (created once).

    Uses ``flows.pipeline.default_flow()`` (a running flow) when that module exists;
    otherwise falls back to a simulated :class:`FrameSource` and logs a note. Living in an
    imported module, the singleton outlives sessions (Bokeh clears an app script's globals).
    """
    global _default
    with _default_lock:
        if _default is None:
            try:
                from flows.pipeline import default_flow
            except ImportError as exc:
                if exc.name != "flows.pipeline":
                    raise  # the module exists but is broken: do not hide that
                log.warning("flows.pipeline.default_flow is not available (%s); "
                            "serving simulated in-memory bars instead", exc)
                source = FrameSource.synthetic(20, n_bars=300)
                source.simulate()
                _default = source
            else:
                _default = default_flow()
        return _default


__all__ = ["BAR_COLUMNS", "BarSource", "FrameSource", "default_source", "empty_bars"]
