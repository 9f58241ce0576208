"""Recorded trades -- CSV, Parquet and venue websocket captures -- replayed as TradeBatch.

:func:`read_trades` streams one file as ``(TradeBatch, Quarantine)`` pairs, chunk by chunk, so a
10M-row file never sits in memory at once. Rows that cannot be parsed are not dropped and do not
raise: they come back as quarantine records with a reason, so that
``rows read = trades + quarantined`` for every file. Value checks (negative price, zero size,
time in the future) are left to :mod:`flows.validate`. :class:`Replayer` chains files for the CLI,
at full speed or paced by event time. Every user mistake raises :class:`~flows.feeds.FeedError`.

Websocket captures (``.jsonl``: ``{"recv_ts": <unix s>, "frame": <frame as received>}`` a line,
as ``tapeflow record`` writes them after a header line naming the venue) are parsed by the venue's
own parser: Binance aggTrade/trade frames, Coinbase ``matches``
(:class:`~flows.feeds.coinbase.CoinbaseParser`), Polygon ``T`` trades and ``AM`` minute bars
(:class:`~flows.feeds.polygon.PolygonParser`; the bars come as :class:`BarBatch`). The venue is
read from the header, or from the shape of the first frames (:func:`~flows.feeds.record.sniff_venue`).

Trade columns (DESIGN section 3): ``time, symbol, price, size`` and optionally
``trade_id, side, recv_time``; header names are matched case-insensitively.

``time`` (and ``recv_time``) may be ISO-8601 text (naive text is taken as UTC), a Parquet
timestamp, or an epoch number in ``time_unit`` s/ms/us/ns. When ``time_unit`` is None the unit of
numbers is inferred once per file from the median magnitude of the first chunk
(:func:`infer_time_unit`): below 1e11 seconds, below 1e14 milliseconds, below 1e17 microseconds,
else nanoseconds -- unambiguous for any date between 1973 and 5138.
"""
from __future__ import annotations

import csv
import math
import os
import time as _time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from flows.feeds import FeedError
from flows.feeds.binance import (
    AGG_COLUMNS,
    KLINE_COLUMNS,
    parse_agg_trade,
    parse_kline,
    parse_trade,
    rows_to_batch,
    stream_kind,
)
from flows.feeds.record import VENUES, RawFrame, capture_records, sniff_venue
from flows.schema import (
    BUY,
    NO_ID,
    NS,
    REASONS,
    SELL,
    BarBatch,
    Quarantine,
    SymbolTable,
    TradeBatch,
)

__all__ = ["FORMATS", "TIME_UNITS", "BinanceCapture", "Replayer", "infer_time_unit",
           "read_binance_capture", "read_trades"]

#: Formats :func:`read_trades` understands (``record``: a ``tapeflow record`` file, any venue).
FORMATS = ("csv", "parquet", "binance", "coinbase", "polygon", "record")
#: Epoch time units and their length in ns.
TIME_UNITS: dict[str, int] = {"s": NS, "ms": 1_000_000, "us": 1_000, "ns": 1}

REQUIRED = ("time", "symbol", "price", "size")
OPTIONAL = ("trade_id", "side", "recv_time")
#: Columns of ready-made OHLCV bar files (``--bars TF``), and other names they go by.
BAR_REQUIRED = ("time", "symbol", "open", "high", "low", "close", "volume")
BAR_OPTIONAL = ("trades", "vwap")
ALIASES = {"time": ("date", "timestamp", "datetime"), "symbol": ("name", "ticker")}
_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NUMBER_OR_NAN = r"(?i)^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)$"
_INTEGER = r"^[+-]?\d{1,18}$"
_SIDES = {"buy": BUY, "b": BUY, "1": BUY, "+1": BUY, "sell": SELL, "s": SELL, "-1": SELL}
_MAX_NS = 2**63 - 1


def infer_time_unit(values: np.ndarray) -> str:
    """Return the epoch unit (s, ms, us, ns) of numeric times from their median magnitude.

    Examples
    --------
    >>> infer_time_unit(np.array([1618677448.08]))
    's'
    >>> infer_time_unit(np.array([1618677448083, 1618677448084]))
    'ms'
    >>> infer_time_unit(np.array([1618677448083123456]))
    'ns'
    """
    finite = np.abs(np.asarray(values, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    m = float(np.median(finite)) if len(finite) else 0.0
    return "s" if m < 1e11 else "ms" if m < 1e14 else "us" if m < 1e17 else "ns"


# --------------------------------------------------------------------------- files and formats

def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FeedError(f"{p}: no such file")
    if p.is_dir():
        raise FeedError(f"{p}: is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise FeedError(f"{p}: permission denied")
    if p.stat().st_size == 0:
        raise FeedError(f"{p}: empty file")
    return p


def _codec(p: Path) -> str | None:
    return _CODECS.get(p.suffix.lower())


def _resolve_format(p: Path, format: str | None) -> str:
    """The reader for ``p``: ``csv``, ``parquet`` or a venue (binance, coinbase, polygon)."""
    if format is not None:
        fmt = format.strip().lower()
        if fmt not in FORMATS:
            raise FeedError(f"{p.name}: unknown format {format!r} (choose {', '.join(FORMATS)})")
        if fmt in ("csv", "parquet"):
            return fmt
    else:
        suffix = Path(p.stem).suffix.lower() if _codec(p) else p.suffix.lower()
        if suffix not in _EXTENSIONS:
            raise FeedError(f"{p.name}: cannot tell the format from the extension {suffix!r}; "
                            f"pass a format ({', '.join(FORMATS)})")
        fmt = _EXTENSIONS[suffix]
        if fmt != "jsonl":
            return fmt
    if _codec(p):
        raise FeedError(f"{p.name}: compressed captures are not supported; unpack it")
    venue, header = sniff_venue(p)
    if header is not None and venue not in VENUES:
        raise FeedError(f"{p.name}: recorded from unknown venue {venue!r} "
                        f"(this tapeflow replays {', '.join(VENUES)})")
    if fmt == "record":
        if header is None:
            raise FeedError(f"{p.name}: no tapeflow record header line; pass the venue as the "
                            f"format ({', '.join(VENUES)})")
        return str(venue)
    if fmt in VENUES:
        if header is not None and venue != fmt:
            raise FeedError(f"{p.name}: recorded from {venue}, not {fmt}; drop --format or "
                            f"pass --format {venue}")
        return fmt
    return venue or "binance"  # a capture with no telling frame yet: the original format


def _check_time_unit(time_unit: str | None) -> str | None:
    if time_unit is None:
        return None
    unit = time_unit.strip().lower()
    if unit not in TIME_UNITS:
        raise FeedError(f"bad time unit {time_unit!r} (choose {', '.join(TIME_UNITS)})")
    return unit


def _columns(p: Path, have: Sequence[str], bars: bool = False) -> dict[str, str]:
    """Map the trade (or bar) column names to the file's own names; name what is missing."""
    required, optional = (BAR_REQUIRED, BAR_OPTIONAL) if bars else (REQUIRED, OPTIONAL)
    lookup = {h.strip().lower(): h for h in have}
    for name, others in ALIASES.items():
        for other in others:
            if name not in lookup and other in lookup:
                lookup[name] = lookup[other]
    missing = [c for c in required if c not in lookup]
    if missing:
        listed = ", ".join(h.strip() for h in have) or "none"
        cols = ", ".join(repr(c) for c in missing)
        raise FeedError(f"{p.name}: missing column{'s' if len(missing) > 1 else ''} {cols} "
                        f"(have: {listed})")
    return {c: lookup[c] for c in required + optional if c in lookup}


# --------------------------------------------------------------------------- column parsing

def _is_text(arr: pa.Array) -> bool:
    return pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)


def _text(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return pc.utf8_trim_whitespace(arr)


def _missing(arr: pa.Array) -> np.ndarray:
    """Return True where a value is null or empty text."""
    miss = arr.is_null()
    if _is_text(arr):
        miss = pc.or_(miss, pc.equal(pc.utf8_length(arr), 0))
    return pc.fill_null(miss, True).to_numpy(zero_copy_only=False)


def _parse_numbers(arr: pa.Array, target: pa.DataType, pattern: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cast text to ``target``; return values and a mask of the entries that would not parse."""
    try:
        out = pc.cast(arr, target)
        ok = np.ones(len(arr), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok_arr = pc.fill_null(pc.match_substring_regex(arr, pattern), False)
        out = pc.cast(pc.if_else(ok_arr, arr, pa.scalar("0")), target)
        ok = ok_arr.to_numpy(zero_copy_only=False)
    fill = np.nan if pa.types.is_floating(target) else 0
    return pc.fill_null(out, pa.scalar(fill, target)).to_numpy(zero_copy_only=False), ~ok


def _floats(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(float64 values, unparsable mask)``; literal nan/inf pass through as values."""
    if _is_text(arr) or pa.types.is_dictionary(arr.type):
        return _parse_numbers(_text(arr), pa.float64(), _NUMBER_OR_NAN)
    vals = pc.fill_null(arr.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    return vals, np.zeros(len(arr), dtype=bool)


def _ints(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    if _is_text(arr) or pa.types.is_dictionary(arr.type):
        return _parse_numbers(_text(arr), pa.int64(), _INTEGER)
    if pa.types.is_floating(arr.type):
        vals = pc.fill_null(arr, 0.0).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(vals) | (vals != np.round(vals)) | (np.abs(vals) > 2**62)
        return np.where(bad, 0, vals).astype(np.int64), bad
    return pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), \
        np.zeros(len(arr), dtype=bool)


class _TimeParser:
    """Turn one file's time column into int64 ns, deciding text-vs-number and unit once."""

    def __init__(self, unit: str | None):
        self.unit = unit
        self.numeric: bool | None = None
        # A failed cast costs far more than a good one: try the form that worked last first.
        self.iso_forms = [pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")]

    def __call__(self, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ns, unparsable mask)``."""
        if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
            ts = arr.cast(pa.timestamp("ns", tz=getattr(arr.type, "tz", None)))
            return pc.fill_null(ts.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), \
                np.zeros(len(arr), dtype=bool)
        if pa.types.is_integer(arr.type):
            vals = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
            return self._scale(vals, np.zeros(len(vals), dtype=bool))
        if pa.types.is_floating(arr.type):
            vals = pc.fill_null(arr, np.nan).to_numpy(zero_copy_only=False)
            return self._scale(vals, ~np.isfinite(vals))
        text = _text(arr)
        if self.numeric is None:
            filled = text.filter(pc.greater(pc.utf8_length(text), 0))
            numbers = pc.sum(pc.match_substring_regex(filled, _NUMBER)).as_py() or 0
            self.numeric = len(filled) > 0 and numbers * 2 >= len(filled)
        if not self.numeric:
            return self._iso(text)
        ints, not_int = _parse_numbers(text, pa.int64(), _INTEGER)
        if not not_int.any():
            return self._scale(ints, not_int)
        floats, bad = _parse_numbers(text, pa.float64(), _NUMBER)
        ns, bad_f = self._scale(floats, bad)
        ns_i, _ = self._scale(ints, not_int)
        return np.where(not_int, ns, ns_i), np.where(not_int, bad_f, False)

    def _scale(self, vals: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.unit is None:
            self.unit = infer_time_unit(vals[~bad])
        mult = TIME_UNITS[self.unit]
        if vals.dtype.kind == "f":
            ns = vals * float(mult)
            bad = bad | ~(np.abs(ns) < 9.2e18)
            return np.where(bad, 0, np.rint(np.where(bad, 0, ns))).astype(np.int64), bad
        bad = bad | (np.abs(vals) > _MAX_NS // mult)
        return np.where(bad, 0, vals) * mult, bad

    def _iso(self, text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        for target in list(self.iso_forms):
            try:
                ts = pc.cast(text, target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            self.iso_forms.remove(target)
            self.iso_forms.insert(0, target)
            return pc.fill_null(ts.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), \
                np.zeros(len(text), dtype=bool)
        # Mixed or unusual ISO forms (offsets and naive text together, garbage rows).
        parsed = pd.to_datetime(pd.Series(text.to_numpy(zero_copy_only=False), dtype=object),
                                format="ISO8601", utc=True, errors="coerce")
        bad = parsed.isna().to_numpy()
        ns = parsed.dt.tz_localize(None).dt.as_unit("ns").to_numpy().view(np.int64)
        return np.where(bad, 0, ns), bad


def _symbol_codes(arr: pa.Array, symbols: SymbolTable) -> tuple[np.ndarray, np.ndarray]:
    """Code symbol names through ``symbols`` via a dictionary (hashing, not sorting, per row)."""
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr if _is_text(arr) else arr.cast(pa.string()))
    names = pc.utf8_trim_whitespace(arr.dictionary.cast(pa.string())).to_pylist()
    keep = [i for i, name in enumerate(names) if name]
    lut = np.full(len(names) + 1, -1, dtype=np.int32)  # the extra slot is for null indices
    if keep:
        lut[keep] = symbols.codes([names[i] for i in keep])
    idx = pc.fill_null(arr.indices.cast(pa.int64()), len(names)).to_numpy(zero_copy_only=False)
    codes = lut[idx]
    return codes, codes < 0


def _sides(arr: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(arr.type):  # map the few distinct values, not every row
        lut = np.append(_sides(arr.dictionary), np.int8(0))
        idx = pc.fill_null(arr.indices.cast(pa.int64()), len(arr.dictionary))
        return lut[idx.to_numpy(zero_copy_only=False)]
    if not (_is_text(arr) or pa.types.is_dictionary(arr.type)):
        vals = pc.fill_null(arr.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        return np.sign(np.nan_to_num(vals)).astype(np.int8)
    keys = list(_SIDES)
    idx = pc.index_in(pc.utf8_lower(_text(arr)), value_set=pa.array(keys))
    lut = np.array([_SIDES[k] for k in keys] + [0], dtype=np.int8)
    return lut[pc.fill_null(idx, len(keys)).to_numpy(zero_copy_only=False)]


def _raw_rows(chunk: pa.RecordBatch, idx: np.ndarray) -> list[str]:
    """The rows ``idx`` of a chunk as comma-joined text, for quarantine records."""
    return [",".join("" if v is None else str(v) for v in row.values())
            for row in chunk.take(pa.array(idx)).to_pylist()]


class _ChunkParser:
    """Parse tabular chunks (CSV text or typed Parquet) into a batch and its quarantine."""

    def __init__(self, names: dict[str, str], symbols: SymbolTable, time_unit: str | None):
        self.names, self.symbols = names, symbols
        self.time = _TimeParser(time_unit)
        self.recv = _TimeParser(time_unit)

    def _columns(self, chunk: pa.RecordBatch, required: Sequence[str]):
        """The chunk's columns by our names, the rows missing a required value, times, symbols."""
        col = {c: chunk.column(chunk.schema.get_field_index(n)) for c, n in self.names.items()}
        n = chunk.num_rows
        missing = np.zeros(n, dtype=bool)
        for c in required:
            missing |= _missing(col[c])
        t, bad_time = self.time(col["time"])
        sym, no_sym = _symbol_codes(col["symbol"], self.symbols)
        return col, n, missing, t, bad_time, sym, no_sym

    def __call__(self, chunk: pa.RecordBatch) -> tuple[TradeBatch, Quarantine]:
        """Parse one chunk whose rows look like (CSV, ISO or epoch time)::

            time,symbol,price,size,trade_id,side
            2021-04-17T16:37:28.084Z,YFIUSDT,49966.7,0.001,52599685,buy
            1618677448450,YFIUSDT,49964.5,0.001,52599686,s
        """
        col, n, missing, t, bad_time, sym, no_sym = self._columns(chunk, REQUIRED)
        price, bad_price = _floats(col["price"])
        size, bad_size = _floats(col["size"])
        if "trade_id" in col:
            tid, bad_id = _ints(col["trade_id"])
            no_id = _missing(col["trade_id"])
            tid, bad_id = np.where(no_id, NO_ID, tid), bad_id & ~no_id
        else:
            tid, bad_id = np.full(n, NO_ID, dtype=np.int64), np.zeros(n, dtype=bool)
        side = _sides(col["side"]) if "side" in col else np.zeros(n, dtype=np.int8)
        if "recv_time" in col:
            recv, bad_recv = self.recv(col["recv_time"])
            # optional: unknown, not rejected (np.where: Arrow timestamps come back read-only)
            recv = np.where(bad_recv | _missing(col["recv_time"]), 0, recv)
        else:
            recv = np.zeros(n, dtype=np.int64)

        reason = np.full(n, -1, dtype=np.int8)
        for mask, name in ((bad_id, "malformed"), (bad_size, "non_finite_size"),
                           (bad_price, "non_finite_price"), (bad_time, "bad_time"),
                           (missing | no_sym, "missing_field")):
            reason[mask] = REASONS.index(name)
        bad = reason >= 0
        batch = TradeBatch(t, sym, price, size, tid, side, recv)
        if not bad.any():
            return batch, Quarantine()
        idx = np.flatnonzero(bad)
        raw = _raw_rows(chunk, idx)
        quarantine = Quarantine(t[idx], sym[idx], price[idx], size[idx], tid[idx], reason[idx],
                                raw)
        return batch.take(~bad), quarantine


class _BarChunkParser(_ChunkParser):
    """Parse tabular chunks of ready-made OHLCV bars into a :class:`BarBatch` and quarantine."""

    def __call__(self, chunk: pa.RecordBatch) -> tuple[BarBatch, Quarantine]:
        """Parse one chunk whose rows look like (the S&P 500 daily file)::

            date,open,high,low,close,volume,Name
            2017-10-16,67.2,67.37,66.77,66.91,1473459,A
        """
        col, n, missing, t, bad_time, sym, no_sym = self._columns(chunk, BAR_REQUIRED)
        values, bad_number = {}, np.zeros(n, dtype=bool)
        for c in ("open", "high", "low", "close", "volume"):
            values[c], bad = _floats(col[c])
            bad_number |= bad
        trades = _ints(col["trades"])[0] if "trades" in col else np.zeros(n, dtype=np.int64)
        vwap = _floats(col["vwap"])[0] if "vwap" in col else np.full(n, np.nan)
        reason = np.full(n, -1, dtype=np.int8)
        for mask, name in ((bad_number, "non_finite_price"), (bad_time, "bad_time"),
                           (missing | no_sym, "missing_field")):
            reason[mask] = REASONS.index(name)
        batch = BarBatch(t, sym, values["open"], values["high"], values["low"], values["close"],
                         values["volume"], trades, vwap)
        bad = reason >= 0
        if not bad.any():
            return batch, Quarantine()
        idx = np.flatnonzero(bad)
        raw = _raw_rows(chunk, idx)
        quarantine = Quarantine(t[idx], sym[idx], values["close"][idx], values["volume"][idx],
                                np.full(len(idx), NO_ID, np.int64), reason[idx], raw)
        return batch.take(~bad), quarantine


# --------------------------------------------------------------------------- CSV and Parquet

def _slices(chunk: pa.RecordBatch, rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, chunk.num_rows, rows):
        yield chunk.slice(start, rows)


def _csv_header(p: Path) -> list[str]:
    with pa.input_stream(str(p), compression=_codec(p)) as f:
        head = f.read(1 << 20)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    first = text.splitlines()[0] if text.strip() else ""
    if not first.strip():
        raise FeedError(f"{p.name}: empty file (no header line)")
    return next(csv.reader([first]))


def _iter_csv(p: Path, symbols: SymbolTable, time_unit: str | None, batch_rows: int,
              bars: bool = False) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    return _csv_chunks(p, _columns(p, _csv_header(p), bars), symbols, time_unit, batch_rows, bars)


def _csv_chunks(p: Path, names: dict[str, str], symbols: SymbolTable, time_unit: str | None,
                batch_rows: int, bars: bool = False) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    invalid: list[str] = []

    def on_invalid(row) -> str:
        invalid.append(row.text or "")
        return "skip"

    raw = pa.OSFile(str(p), "r")
    stream = pa.CompressedInputStream(raw, _codec(p)) if _codec(p) else raw
    block = int(min(max(batch_rows * 64, 1 << 20), 64 << 20))
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=block),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(names.values()),
                column_types={n: pa.string() for n in names.values()},
                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
        parse = (_BarChunkParser if bars else _ChunkParser)(names, symbols, time_unit)
        while True:
            try:
                chunk = reader.read_next_batch()
            except StopIteration:
                break
            for part in _slices(chunk, batch_rows):
                batch, quarantine = parse(part)
                if invalid:
                    quarantine = Quarantine.concat([quarantine, Quarantine.malformed(invalid)])
                    invalid.clear()
                yield batch, quarantine, raw.tell()
        if invalid:
            yield TradeBatch(), Quarantine.malformed(invalid), raw.tell()
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as exc:
        raise FeedError(f"{p.name}: cannot read as CSV: {exc}") from None
    finally:
        raw.close()


def _open_parquet(p: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(str(p))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FeedError(f"{p.name}: not a readable Parquet file ({exc})") from None


def _iter_parquet(p: Path, symbols: SymbolTable, time_unit: str | None, batch_rows: int,
                  bars: bool = False) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    schema = _open_parquet(p).schema_arrow
    names = _columns(p, schema.names, bars)
    as_dict = [names[c] for c in ("symbol", "side")
               if c in names and pa.types.is_string(schema.field(names[c]).type)] or None
    return _parquet_chunks(p, pq.ParquetFile(str(p), read_dictionary=as_dict), names, symbols,
                           time_unit, batch_rows, bars)


def _parquet_chunks(p: Path, pf: pq.ParquetFile, names: dict[str, str], symbols: SymbolTable,
                    time_unit: str | None, batch_rows: int, bars: bool = False
                    ) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    total_rows, total_bytes = max(pf.metadata.num_rows, 1), p.stat().st_size
    parse = (_BarChunkParser if bars else _ChunkParser)(names, symbols, time_unit)
    done = 0
    try:
        for chunk in pf.iter_batches(batch_size=batch_rows, columns=list(names.values())):
            done += chunk.num_rows
            batch, quarantine = parse(chunk)
            yield batch, quarantine, total_bytes * done // total_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise FeedError(f"{p.name}: cannot read as Parquet: {exc}") from None


# --------------------------------------------------------------------------- websocket captures

def _bad_line(line: bytes, frame, reason: str = "malformed") -> Quarantine:
    """A quarantine record for a capture line: a raw frame's own text, else the line."""
    text = str(frame) if isinstance(frame, RawFrame) else line.decode("utf-8", "replace").strip()
    return Quarantine.malformed([text], reason)


def _iter_binance(p: Path, symbols: SymbolTable, batch_rows: int, ignored: Counter
                  ) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    rows: list[tuple] = []
    bad: list[Quarantine] = []
    pos = 0

    def flush() -> tuple[TradeBatch, Quarantine, int]:
        batch = rows_to_batch(rows, symbols) if rows else TradeBatch()
        quarantine = Quarantine.concat(bad)
        rows.clear()
        bad.clear()
        return batch, quarantine, pos

    for pos, line, frame, recv_ts in capture_records(p):
        if not isinstance(frame, dict):
            bad.append(_bad_line(line, frame))
        elif (kind := stream_kind(frame)) not in ("aggTrade", "trade"):
            ignored[kind] += 1
        else:
            try:
                data = frame.get("data", frame)
                parse = parse_agg_trade if kind == "aggTrade" else parse_trade
                rows.append(parse(data, round(recv_ts * NS)))
            except KeyError:
                bad.append(_bad_line(line, frame, "missing_field"))
            except (ValueError, TypeError, OverflowError):
                bad.append(_bad_line(line, frame))
        if len(rows) + len(bad) >= batch_rows:
            yield flush()
    if rows or bad:
        yield flush()


def _recv_ns(recv_ts: float) -> int:
    return round(recv_ts * NS) if math.isfinite(recv_ts) else 0


def _iter_parsed(p: Path, parser, batch_rows: int, ignored: Counter,
                 bars_of: Callable[[TradeBatch, dict], BarBatch | None] | None = None
                 ) -> Iterator[tuple[TradeBatch | BarBatch, Quarantine, int]]:
    """Each frame of a capture through a venue's live ``parser``: trades (and quarantine) in
    batches of about ``batch_rows``; ``bars_of(trades, info)`` may return a frame's bars, yielded
    in file order (the trades before them first)."""
    trades: list[TradeBatch] = []
    bad: list[Quarantine] = []
    rows = pos = 0
    for pos, line, frame, recv_ts in capture_records(p):
        bars = None
        if frame is None:
            bad.append(_bad_line(line, frame))
            rows += 1
        else:
            batch, quarantine, info = parser.parse(frame, _recv_ns(recv_ts))
            ignored.update(info.get("ignored", {}))
            trades.append(batch)
            bad.append(quarantine)
            rows += len(batch) + len(quarantine)
            if bars_of is not None:
                bars = bars_of(batch, info)
        if rows and (rows >= batch_rows or bars is not None):
            yield TradeBatch.concat(trades), Quarantine.concat(bad), pos
            trades, bad, rows = [], [], 0
        if bars is not None:
            yield bars, Quarantine(), pos
    if rows:
        yield TradeBatch.concat(trades), Quarantine.concat(bad), pos


def _iter_coinbase(p: Path, symbols: SymbolTable, batch_rows: int, ignored: Counter
                   ) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    """A Coinbase ``matches`` capture, each frame through :class:`CoinbaseParser` as live."""
    from flows.feeds.coinbase import CoinbaseParser

    return _iter_parsed(p, CoinbaseParser(symbols), batch_rows, ignored)


def _iter_polygon(p: Path, symbols: SymbolTable, batch_rows: int, ignored: Counter
                  ) -> Iterator[tuple[TradeBatch | BarBatch, Quarantine, int]]:
    """A Polygon capture through :class:`PolygonParser`: trades, and ``AM`` minute aggregates
    as :class:`BarBatch` (in file order: pending trades are yielded before a frame's bars).

    As the live :class:`~flows.feeds.polygon.PolygonFeed` does, an ``AM`` bar of a minute in
    which trades of its symbol arrived (among the symbol's last 16 such minutes) is left out
    -- the trades built that bar -- and counted as ignored ``AM_minute_had_trades``.
    """
    from flows.feeds.polygon import PolygonParser

    traded: dict[int, deque] = {}

    def bars_of(batch: TradeBatch, info: dict) -> BarBatch | None:
        if info.get("status"):
            ignored["status"] += len(info["status"])
        for code, minute in zip(batch.symbol.tolist(), (batch.time // (60 * NS)).tolist()):
            seen = traded.setdefault(code, deque(maxlen=16))
            if minute not in seen:
                seen.append(minute)
        bars = info.get("bars")
        if bars is not None:
            covered = np.array([m in traded.get(c, ()) for c, m in zip(
                bars.symbol.tolist(), (bars.time // (60 * NS)).tolist())], dtype=bool)
            if covered.any():
                ignored["AM_minute_had_trades"] += int(covered.sum())
                bars = bars.take(~covered) if not covered.all() else None
        return bars

    return _iter_parsed(p, PolygonParser(symbols), batch_rows, ignored, bars_of)


@dataclass
class BinanceCapture:
    """Everything in one Binance combined-stream capture (see :func:`read_binance_capture`).

    Attributes
    ----------
    batches : one TradeBatch per aggTrade frame, in arrival order (as a live feed emits them).
    agg : DataFrame of the aggTrades: symbol, time (datetime64[ns], UTC), price, size, agg_id,
        side, recv_time, first_id, last_id, raw_trades (``last_id - first_id + 1``),
        buyer_maker, recv_ts.
    klines : DataFrame of every kline update: symbol, interval, t (minute start,
        datetime64[ns], UTC), open, high, low, close, volume (v), trades (n), first_id (f),
        last_id (L), closed (x), quote_volume (q), taker_buy_volume (V),
        taker_buy_quote_volume (Q), event_time (E), recv_ts (s since the epoch).
    ignored : frames that carry no trade, by stream kind (``kline_1m``, ``depth@100ms``, ...).
    quarantine : lines that are not JSON or aggTrade frames missing a field.
    frames : number of non-blank lines read.
    """

    path: Path
    batches: list[TradeBatch]
    agg: pd.DataFrame
    klines: pd.DataFrame
    ignored: dict[str, int]
    quarantine: Quarantine = field(default_factory=Quarantine)
    frames: int = 0

    @property
    def trades(self) -> TradeBatch:
        """All aggTrades as one batch, in arrival order."""
        return TradeBatch.concat(self.batches)


def read_binance_capture(path: str | os.PathLike, symbols: SymbolTable) -> BinanceCapture:
    """Read a Binance combined-stream capture: aggTrades as trades, kline updates, the rest counted.

    Each line is ``{"recv_ts": <unix s>, "frame": <frame as received>}``; frames are
    ``{"stream": "ftmusdt@aggTrade", "data": {...}}`` envelopes (bare frames with an ``"e"``
    field work too). See :func:`~flows.feeds.binance.parse_agg_trade` and
    :func:`~flows.feeds.binance.parse_kline` for the frames parsed.

    Examples
    --------
    >>> import tempfile
    >>> line = ('{"recv_ts":1628952397.7059772,"frame":{"stream":"ftmusdt@aggTrade","data":'
    ...         '{"e":"aggTrade","E":1628952396573,"s":"FTMUSDT","a":31718372,"p":"0.33993000",'
    ...         '"q":"99.90000000","f":38248910,"l":38248910,"T":1628952396572,"m":true,'
    ...         '"M":true}}}')
    >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write(line + "\\n" + "not json\\n")
    >>> cap = read_binance_capture(f.name, SymbolTable())
    >>> len(cap.batches), cap.batches[0].side.tolist(), cap.quarantine.counts()
    (1, [-1], {'malformed': 1})
    """
    p = _check_path(path)
    batches, agg_rows, klines, bad = [], [], [], []
    ignored: Counter = Counter()
    frames = 0
    for _, line, frame, recv_ts in capture_records(p):
        frames += 1
        if not isinstance(frame, dict):
            bad.append(_bad_line(line, frame))
            continue
        kind = stream_kind(frame)
        data = frame.get("data", frame)
        try:
            if kind == "aggTrade":
                row = parse_agg_trade(data, round(recv_ts * NS))
                agg_rows.append(row + (data["m"], recv_ts))
                batches.append(rows_to_batch([row], symbols))
                continue
            if kind.startswith("kline"):
                klines.append(parse_kline(data, recv_ts))
        except KeyError:
            bad.append(_bad_line(line, frame, "missing_field"))
            continue
        except (ValueError, TypeError, OverflowError):
            bad.append(_bad_line(line, frame))
            continue
        ignored[kind] += 1

    agg = pd.DataFrame(agg_rows, columns=list(AGG_COLUMNS) + ["buyer_maker", "recv_ts"])
    agg["time"] = pd.to_datetime(agg["time"].astype(np.int64), unit="ns")
    agg["raw_trades"] = (agg["last_id"] - agg["first_id"] + 1).astype(np.int64)
    kl = pd.DataFrame(klines, columns=list(KLINE_COLUMNS))
    for c in ("t", "event_time"):
        kl[c] = pd.to_datetime(kl[c].astype(np.int64) * 1_000_000, unit="ns")
    return BinanceCapture(p, batches, agg, kl, dict(ignored), Quarantine.concat(bad), frames)


_CAPTURE_READERS = {"binance": _iter_binance, "coinbase": _iter_coinbase, "polygon": _iter_polygon}


# --------------------------------------------------------------------------- public readers

def _iter_file(path: str | os.PathLike, symbols: SymbolTable, format: str | None,
               time_unit: str | None, batch_rows: int, ignored: Counter, bars: bool = False
               ) -> Iterator[tuple[TradeBatch, Quarantine, int]]:
    p = _check_path(path)
    fmt = _resolve_format(p, format)
    if bars and fmt in VENUES:
        raise FeedError(f"{p.name}: websocket captures hold trades, not bars; drop --bars")
    unit = _check_time_unit(time_unit)
    if batch_rows < 1:
        raise FeedError(f"batch_rows must be at least 1, got {batch_rows}")
    if fmt == "csv":
        return _iter_csv(p, symbols, unit, batch_rows, bars)
    if fmt == "parquet":
        return _iter_parquet(p, symbols, unit, batch_rows, bars)
    return _CAPTURE_READERS[fmt](p, symbols, batch_rows, ignored)


def read_trades(
    path: str | os.PathLike,
    *,
    symbols: SymbolTable,
    format: str | None = None,
    time_unit: str | None = None,
    batch_rows: int = 100_000,
) -> Iterator[tuple[TradeBatch, Quarantine]]:
    """Stream a file of recorded trades as ``(TradeBatch, Quarantine)`` pairs in file order.

    Parameters
    ----------
    path : file to read; ``.gz``/``.bz2``/``.zst`` compressed CSV is read as well.
    symbols : the flow's symbol table; new symbols are added to it.
    format : ``csv``, ``parquet``, a venue (``binance``, ``coinbase``, ``polygon``) or
        ``record`` (a ``tapeflow record`` file); inferred when None from the extension
        (``.csv``, ``.parquet``/``.pq``, ``.jsonl``) and, for captures, the header line or
        the first frames. Polygon ``AM`` minute aggregates come as :class:`BarBatch`.
    time_unit : epoch unit (s, ms, us, ns) of numeric times; inferred when None (module doc).
    batch_rows : at most this many rows per batch.

    Raises
    ------
    FeedError
        On a missing, unreadable or empty file, an unknown format or time unit, or a missing
        trade column -- checked before the first batch is produced.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    ...     _ = f.write("time,symbol,price,size\\n"
    ...                 "2021-04-17T16:37:28.084Z,YFIUSDT,49966.7,0.001\\n"
    ...                 "yesterday,YFIUSDT,49964.5,0.001\\n")
    >>> [(len(b), q.counts()) for b, q in read_trades(f.name, symbols=SymbolTable())]
    [(1, {'bad_time': 1})]
    """
    parts = _iter_file(path, symbols, format, time_unit, batch_rows, Counter())
    return ((batch, quarantine) for batch, quarantine, _ in parts)


class Replayer:
    """Replay recorded files through a flow, at full speed or paced by event time.

    Parameters
    ----------
    paths : one file or several, replayed in order.
    symbols : the flow's symbol table.
    format, time_unit : as for :func:`read_trades`, applied to every file.
    bars : the files hold ready-made OHLCV bars (batches are :class:`BarBatch`) rather than
        trades.
    speed : None for as fast as possible, else a factor of real time (2.0 = twice as fast).
        When paced, batches are cut into event-time windows of ``0.1 s * speed`` (about ten
        batches per wall-clock second) and each is released when the wall clock reaches
        its event time.
    clock, sleep : monotonic clock (ns) and sleep (s), injectable for tests.

    Attributes
    ----------
    rows_read : rows seen so far (trades + quarantined), the CLI's progress count.
    bytes_read, total_bytes : progress through the files, in bytes on disk.
    rows_total : total rows when known up front (Parquet metadata), else None.
    ignored : frames that carried no trades, by stream kind or frame type (websocket captures).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        symbols: SymbolTable,
        format: str | None = None,
        time_unit: str | None = None,
        speed: float | None = None,
        batch_rows: int = 100_000,
        bars: bool = False,
        clock: Callable[[], int] = _time.monotonic_ns,
        sleep: Callable[[float], None] = _time.sleep,
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [_check_path(p) for p in paths]
        if not self.paths:
            raise FeedError("replay: no file given")
        self.bars = bars
        for p in self.paths:  # fail on a bad file before replaying the good ones
            _iter_file(p, symbols, format, time_unit, batch_rows, Counter(), bars).close()
        if speed is not None and not (speed > 0 and math.isfinite(speed)):
            raise FeedError(f"replay: speed must be a positive number or max, got {speed}")
        self.symbols, self.format, self.speed = symbols, format, speed
        self.time_unit = _check_time_unit(time_unit)
        self.batch_rows = batch_rows
        self._clock, self._sleep = clock, sleep
        self.rows_read = 0
        self.bytes_read = 0
        self.total_bytes = sum(p.stat().st_size for p in self.paths)
        self.rows_total = self._rows_total()
        self.ignored: Counter = Counter()

    def _rows_total(self) -> int | None:
        if any(_resolve_format(p, self.format) != "parquet" for p in self.paths):
            return None
        return sum(_open_parquet(p).metadata.num_rows for p in self.paths)

    def __iter__(self) -> Iterator[tuple[TradeBatch, Quarantine]]:
        done = 0
        paced = _Pacer(self.speed, self._clock, self._sleep) if self.speed else None
        for p in self.paths:
            parts = _iter_file(p, self.symbols, self.format, self.time_unit, self.batch_rows,
                               self.ignored, self.bars)
            for batch, quarantine, pos in parts:
                self.rows_read += len(batch) + len(quarantine)
                self.bytes_read = done + pos
                if paced is None:
                    yield batch, quarantine
                else:
                    yield from paced(batch, quarantine)
            done += p.stat().st_size
            self.bytes_read = done


class _Pacer:
    """Cut batches into event-time windows and release each when its time comes."""

    def __init__(self, speed: float, clock: Callable[[], int], sleep: Callable[[float], None]):
        self.speed, self.clock, self.sleep = speed, clock, sleep
        self.window = max(1, int(0.1 * speed * NS))
        self.t0: int | None = None
        self.wall0 = 0
        self.high = 0  # latest event time released; late trades never make us wait

    def __call__(self, batch: TradeBatch, quarantine: Quarantine
                 ) -> Iterator[tuple[TradeBatch, Quarantine]]:
        if not len(batch):
            yield batch, quarantine
            return
        if self.t0 is None:
            self.t0, self.wall0 = int(batch.time[0]), self.clock()
            self.high = self.t0
        bucket = (batch.time - self.t0) // self.window
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(batch)]):
            self.high = max(self.high, int(batch.time[a]))
            delay = (self.wall0 + (self.high - self.t0) / self.speed - self.clock()) / NS
            if delay > 0:
                self.sleep(delay)
            yield batch.take(slice(a, b)), quarantine
            quarantine = Quarantine()
