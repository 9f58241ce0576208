"""The only writer of the Zarr store: bars per timeframe, the quarantine log and checkpoints.

Layout (Zarr v3, see README "Store layout")::

    market.zarr/
      bars/{tf}        dims (time, symbol): open high low close volume trades vwap
      quarantine       dim (record,): time symbol price size trade_id reason raw
    market.zarr.writer/  beside the store, not part of it:
      lock             held by the one writer process
      checkpoint/      engine state to resume exactly after a stop

Each flush writes the changed tail of each timeframe (from the earliest amended bar to the
newest) over the stored rows and appends the rest. ``time`` is stored as int64 nanoseconds with
CF units, so xarray decodes it to ``datetime64[ns]``.

Readers never see a half-written append: a flush that changes shapes resizes several arrays,
and a reader listing the arrays between two resizes would find ``time`` and ``close`` of
different lengths (xarray refuses that). So every group carries consolidated metadata -- all
its arrays' shapes in the root's one ``zarr.json`` -- rewritten (one atomic file replace) only
after all arrays of the flush are written (:meth:`BarStore.publish`). ``xr.open_zarr(path, group="bars/1m")`` reads that
snapshot; rows beyond it are simply not seen until the next open. (Readers that pass
``consolidated=False`` list the arrays one by one and can race with an append; use the
default or :func:`open_bars`.)
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
import zarr.api.asynchronous as zarr_async
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as zsync

from flows.schema import BAR_FIELDS, REASONS, TIMEFRAMES, Quarantine, SymbolTable

TIME_UNITS = "nanoseconds since 1970-01-01"
CHUNK_TIME = 64
CHUNK_SYMBOLS = 512
_FILL = {"volume": 0.0, "trades": 0}


async def _write_arrays(path: str, writes: list[tuple[str, tuple, tuple, np.ndarray]]) -> None:
    """Resize and write several arrays of one group concurrently (one round trip to Zarr)."""
    group = await zarr_async.open_group(store=path, mode="r+")
    by_name: dict[str, list] = {}
    for name, shape, selection, block in writes:
        by_name.setdefault(name, []).append((shape, selection, block))

    async def write(name: str, items: list) -> None:
        arr = await group.getitem(name)
        shape = items[0][0]
        if arr.shape != shape:
            await arr.resize(shape)
        for _, selection, block in items:
            await arr.setitem(selection, block)

    await asyncio.gather(*(write(name, items) for name, items in by_name.items()))


_BLOSC = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)


def _patch_chunks(array_dir: Path, block: np.ndarray, row0: int, dtype: str) -> None:
    """Overwrite rows ``row0:row0+len(block)`` of a 2-D bars array by rewriting its chunk files.

    Only for arrays made by :func:`rows_encoding` ("."-separated keys, bytes + blosc codecs),
    and only within the array's current shape.
    """
    ct, cs = CHUNK_TIME, CHUNK_SYMBOLS
    fill = _fill(array_dir.name, dtype)
    rows = np.arange(row0, row0 + len(block))
    for ci in range(row0 // ct, (rows[-1] // ct) + 1):
        r0, r1 = max(row0, ci * ct), min(row0 + len(block), (ci + 1) * ct)
        for cj in range((block.shape[1] - 1) // cs + 1):
            path = array_dir / f"c.{ci}.{cj}"
            try:
                chunk = np.frombuffer(_BLOSC.decode(path.read_bytes()), dtype="<" + np.dtype(dtype).str[1:])
                chunk = chunk.reshape(ct, cs).copy()
            except FileNotFoundError:
                chunk = np.full((ct, cs), fill, dtype=dtype)
            part = block[r0 - row0 : r1 - row0, cj * cs : (cj + 1) * cs]
            chunk[r0 - ci * ct : r1 - ci * ct, : part.shape[1]] = part
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(_BLOSC.encode(np.ascontiguousarray(chunk, dtype="<" + np.dtype(dtype).str[1:])))
            os.replace(tmp, path)


def writer_dir(path: str | os.PathLike) -> Path:
    """The folder beside a store that holds its writer's lock and checkpoint."""
    path = Path(path)
    return path.with_name(path.name + ".writer")


_NAN_B64 = "AAAAAAAA+H8="  # xarray's _FillValue attribute for a float64 NaN


async def _create_group(path: str, ds: xr.Dataset) -> None:
    """Create a time-indexed group in xarray's Zarr v3 layout and write ``ds`` into it.

    Equivalent to ``ds.to_zarr(..., encoding=rows_encoding(ds))`` (the tests compare both),
    but every array is created and written concurrently: xarray's writer costs ~100 ms a group.
    """
    group = await zarr_async.open_group(store=path, mode="w", zarr_format=3)
    enc = rows_encoding(ds)
    flat = {"name": "default", "separator": "."}

    async def make(name: str, var: xr.Variable) -> None:
        values = var.values
        attrs = dict(var.attrs)
        kw: dict = {"dimension_names": var.dims, "chunk_key_encoding": flat}
        if name == "time":
            values = values.view("int64")
            attrs.update(units=TIME_UNITS, calendar="proleptic_gregorian")
            kw.update(chunks=(CHUNK_TIME,), fill_value=0)
        elif values.dtype.kind in "OUT":  # labels: variable-length strings
            values = np.asarray(values, dtype=object).astype(str)
            kw.update(dtype=str, chunks=(max(len(values), 1),), fill_value="")
            kw["chunk_key_encoding"] = {"name": "default", "separator": "/"}
        else:
            e = enc[name]
            kw.update(chunks=e["chunks"], compressors=e["compressors"])
            if "fill_value" in e:
                kw["fill_value"] = e["fill_value"]
            else:
                kw["fill_value"] = np.nan
                attrs["_FillValue"] = _NAN_B64
        arr = await group.create_array(name, shape=values.shape, dtype=kw.pop("dtype", values.dtype),
                                       attributes=attrs, **kw)
        if values.size:
            await arr.setitem(tuple(slice(None) for _ in values.shape), values)

    await asyncio.gather(*(make(n, v.variable) for n, v in {**ds.coords, **ds.data_vars}.items()))


class StoreError(Exception):
    """A store problem a user can act on (one line)."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


def _fill(name: str, dtype: np.dtype):
    """Value of a row where nothing happened: 0 for counts and volumes, False, else NaN."""
    dtype = np.dtype(dtype)
    if name in _FILL:
        return _FILL[name]
    return False if dtype == bool else 0 if dtype.kind in "iu" else np.nan


def rows_encoding(ds: xr.Dataset) -> dict:
    """Return the Zarr encoding of a time-indexed group: integer time, chunking, fill values.

    Chunk keys use "." (``c.0.0``) so a 2-D chunk is one file; blosc/lz4 with byte shuffle keeps
    a flush's re-encoding of its tail chunks cheap.
    """
    flat = {"name": "default", "separator": "."}
    enc = {"time": {"dtype": "int64", "units": TIME_UNITS, "calendar": "proleptic_gregorian",
                    "chunks": (CHUNK_TIME,), "chunk_key_encoding": flat}}
    for name, var in ds.data_vars.items():
        chunks = (CHUNK_TIME, CHUNK_SYMBOLS) if var.ndim == 2 else (CHUNK_TIME,)
        enc[name] = {"chunks": chunks, "chunk_key_encoding": flat,
                     "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}
        fill = _fill(name, var.dtype)
        if not (isinstance(fill, float) and np.isnan(fill)):  # no NaN masking of real zeros
            enc[name]["fill_value"] = fill
            enc[name]["_FillValue"] = None
    return enc


class BarStore:
    """Write bars, quarantine records and checkpoints into one Zarr v3 store.

    Parameters
    ----------
    path : the store directory (created when missing).
    timeframes : the ``bars/{tf}`` groups this writer maintains.
    symbols : the flow's symbol table; its metadata is kept in the root attributes.

    Only one writer may open a store; a second raises :class:`StoreLockedError`.
    """

    def __init__(self, path: str | os.PathLike, timeframes: tuple[str, ...], symbols: SymbolTable):
        self.path = Path(path)
        self.timeframes = timeframes
        self.symbols = symbols
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.path}: {exc.strerror}") from None
        #: the writer's own files (lock, checkpoint), kept out of the Zarr hierarchy
        self.writer_dir = writer_dir(self.path)
        self.writer_dir.mkdir(exist_ok=True)
        self._lock_file = open(self.writer_dir / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            raise StoreLockedError(f"{self.path} is being written by {holder}; "
                                   "stop it or use --store to write elsewhere") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"tapeflow pid {os.getpid()}")
        self._lock_file.flush()
        self._mutex = threading.Lock()
        try:
            self.root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        except Exception as exc:  # a directory that is not a Zarr v3 store
            self.close()
            raise StoreError(f"{self.path} is not a tapeflow Zarr store ({exc})") from None
        self.root.require_group("bars")
        #: per group written with :meth:`write_rows`: stored row times and second-dim labels
        self._times: dict[str, np.ndarray] = {}
        self._labels: dict[str, list[str]] = {}
        for key in self._row_groups():
            g = self.root[key]
            self._times[key] = np.asarray(g["time"][:], dtype=np.int64)
            dims = {d for _, a in g.arrays() for d in (a.metadata.dimension_names or ()) if d != "time"}
            self._labels[key] = [str(s) for s in g[dims.pop()][:]] if dims else []
        self.flushes = 0
        self._unpublished = True
        self.last_flush_ns = 0

    def _row_groups(self) -> list[str]:
        """Existing groups of rows keyed by time (bars, indicators, breadth, sectors)."""
        out = []
        for family in ("bars", "indicators", "breadth", "sectors", "quality", "quality_feed"):
            if family in self.root:
                out += [f"{family}/{tf}" for tf in TIMEFRAMES if tf in self.root[family]]
        return out

    def publish(self) -> None:
        """Publish the store's current shapes to readers in one atomic metadata write.

        Call after the arrays of a flush are written; cheap when no shape changed.
        """
        if not self._unpublished:
            return
        with warnings.catch_warnings():  # zarr-python (and xarray) read it; the v3 spec lags
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(self.path), zarr_format=3)
        self._unpublished = False

    # -- bars -------------------------------------------------------------------------------

    def stored_symbols(self) -> list[str]:
        """Symbols stored in the bars (the store's symbol order)."""
        for tf in TIMEFRAMES:
            if f"bars/{tf}" in self._labels:
                return list(self._labels[f"bars/{tf}"])
        return []

    def stored_times(self, key: str) -> np.ndarray:
        """Row times stored in group ``key`` (cached; the writer is the only one changing them)."""
        return self._times.get(key, np.empty(0, dtype=np.int64))

    def write_bars(self, tf: str, changes: xr.Dataset | None) -> None:
        """Replace the stored bars from ``changes``' first time onwards with ``changes``.

        ``changes`` holds every in-memory bar from the earliest changed one to the newest, so
        amended bars are rewritten in place and new ones appended; rows are never duplicated.
        """
        self.write_rows(f"bars/{tf}", changes)

    def write_rows(self, key: str, changes: xr.Dataset | None) -> None:
        """Replace the rows of group ``key`` from ``changes``' first time onwards.

        ``changes`` has dim ``time`` and at most one other dim (``symbol``, ``sector``) whose
        labels may grow; any group written this way (bars, indicators, breadth, sectors) gets
        the same in-place amend and append semantics.
        """
        if changes is None or changes.sizes["time"] == 0:
            return
        with self._mutex:
            self._write_rows(key, changes)

    def _write_rows(self, key: str, changes: xr.Dataset) -> None:
        times = changes["time"].values.view("int64")
        other = [d for d in changes.dims if d != "time"]
        dim = other[0] if other else None
        names = [str(s) for s in changes[dim].values] if dim else []
        if key not in self._times:
            parent = key.rpartition("/")[0]
            if parent:
                self.root.require_group(parent)
            zsync(_create_group(str(self.path / key), changes))
            self._unpublished = True
            self._times[key] = times.copy()
            self._labels[key] = names
            return
        stored_names = self._labels[key]
        if names[: len(stored_names)] == stored_names:  # the usual case: same order, maybe more
            new_names = names[len(stored_names):]
            order = np.arange(len(names))
        else:
            known = set(stored_names)
            new_names = [n for n in names if n not in known]
            col = {n: i for i, n in enumerate(stored_names + new_names)}
            order = np.array([col[n] for n in names], dtype=np.int64)
        all_names = stored_names + new_names
        stored = self._times[key]
        start = int(np.searchsorted(stored, times[0]))
        length = start + len(times)
        width = len(all_names)
        identity = len(order) == width and (order == np.arange(width)).all()
        missing = np.setdiff1d(np.arange(len(stored_names)), order)
        old_rows = min(len(stored), length) - start
        writes: list[tuple[str, tuple, tuple, np.ndarray]] = []
        for name, var in changes.data_vars.items():
            values = var.values
            if var.ndim == 1:
                writes.append((name, (length,), (slice(start, length),), values))
                continue
            if identity:
                block = values
            else:
                block = np.full((len(times), width), _fill(name, values.dtype), dtype=values.dtype)
                block[:, order] = values
                if len(missing) and old_rows > 0:  # columns not in changes keep stored values
                    old = zarr.open_array(str(self.path / key / name), mode="r")[start : start + old_rows]
                    block[:old_rows, missing] = old[:, missing]
            writes.append((name, (length, width), (slice(start, length), slice(None)), block))
        if new_names:
            writes.append((dim, (width,), (slice(len(stored_names), None),),
                           np.array(new_names, dtype=object)))
        writes.append(("time", (length,), (slice(start, length),), times))
        if length == len(stored) and not new_names and (times == stored[start:]).all():
            # Same shapes, same times: only values change (the forming bars). Patch 2-D chunk
            # files directly (zarr's per-call overhead is ~2 ms an array); each file is
            # replaced atomically and the published shapes stay valid.
            flat = [w for w in writes if w[0] != "time" and w[3].ndim == 1]
            for name, _, selection, block in writes:
                if name != "time" and block.ndim == 2:
                    _patch_chunks(self.path / key / name, block, selection[0].start, block.dtype)
            if flat:
                zsync(_write_arrays(str(self.path / key), flat))
        else:
            zsync(_write_arrays(str(self.path / key), writes))
            self._unpublished = True
        self._labels[key] = all_names
        self._times[key] = np.concatenate([stored[:start], times])

    def read_tail(self, tf: str, rows: int) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """Return the last ``rows`` stored bars of ``tf`` (times, fields in stored symbol order)."""
        times = self._times.get(f"bars/{tf}")
        if times is None or len(times) == 0:
            return None
        start = max(len(times) - rows, 0)
        g = zarr.open_group(str(self.path / "bars" / tf), mode="r", use_consolidated=False)
        return times[start:], {name: np.asarray(g[name][start:]) for name in BAR_FIELDS}

    def value_before(self, key: str, name: str, t: int) -> float | None:
        """The stored value of 1-D variable ``name`` in group ``key`` at the last row before ``t``."""
        times = self._times.get(key)
        if times is None:
            return None
        row = int(np.searchsorted(times, t)) - 1
        if row < 0:
            return None
        return float(zarr.open_array(str(self.path / key / name), mode="r")[row])

    def size_bytes(self) -> int:
        """Bytes the store takes on disk."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def write_symbol_meta(self) -> None:
        """Record symbol metadata (sector, name, exchange) in the root attributes."""
        meta = {n: self.symbols.meta.get(n, {}) for n in self.symbols.names}
        if self.root.attrs.get("symbols") != meta:
            self.root.attrs.update({"symbols": meta, "timeframes": list(TIMEFRAMES)})

    # -- quarantine ---------------------------------------------------------------------------

    def write_quarantine(self, q: Quarantine) -> None:
        """Append quarantine records (readable with ``xr.open_zarr(path, group="quarantine")``)."""
        if len(q) == 0:
            return
        self.write_records("quarantine", {
            "time": q.time, "symbol": self._names(q.symbol), "price": q.price, "size": q.size,
            "trade_id": q.trade_id,
            "reason": np.asarray(REASONS, dtype=object)[q.reason.astype(np.int64)],
            "raw": np.asarray(q.raw, dtype=object),
        })

    def write_flags(self, flags) -> None:
        """Append quality flags (spikes, volume outliers, id gaps) to ``quality_flags``."""
        from flows.quality import FLAG_REASONS

        if len(flags) == 0:
            return
        self.write_records("quality_flags", {
            "time": flags.time, "symbol": self._names(flags.symbol), "trade_id": flags.trade_id,
            "price": flags.price, "size": flags.size,
            "reason": np.asarray(FLAG_REASONS, dtype=object)[flags.reason.astype(np.int64)],
            "detail": flags.detail,
        })

    def _names(self, codes: np.ndarray) -> np.ndarray:
        names = np.asarray(self.symbols.names + ("",), dtype=object)
        return names[np.where(codes >= 0, codes, len(names) - 1)].astype(object)

    def write_records(self, key: str, columns: dict[str, np.ndarray]) -> None:
        """Append records (dim ``record``; ``time`` as int64 ns) to group ``key``."""
        n = len(columns["time"])
        with self._mutex:
            if key not in self.root:
                ds = xr.Dataset({k: ("record", v) for k, v in columns.items() if k != "time"},
                                coords={"time": ("record", np.asarray(columns["time"]).view("datetime64[ns]"))})
                ds.to_zarr(str(self.path), group=key, mode="w", zarr_format=3, consolidated=False,
                           encoding={"time": {"dtype": "int64", "units": TIME_UNITS,
                                              "calendar": "proleptic_gregorian", "chunks": (65536,)}})
            else:
                g = zarr.open_group(str(self.path / key), mode="r+", use_consolidated=False)
                n0 = g["time"].shape[0]
                for k, v in columns.items():
                    arr = g[k]
                    arr.resize((n0 + n,))
                    arr[n0:] = v
            self._unpublished = True

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Atomically save the state needed to resume (arrays + JSON metadata).

        The arrays go to a new file first; ``meta.json`` naming that file then replaces the
        old one in a single rename, so a stop at any moment leaves a consistent pair.
        """
        folder = self.writer_dir / "checkpoint"
        folder.mkdir(exist_ok=True)
        self.flushes += 1
        name = f"state-{os.getpid()}-{self.flushes}.npz"
        with open(folder / name, "wb") as fh:
            np.savez(fh, **{k.replace("/", "__"): v for k, v in arrays.items()})
        tmp_meta = folder / "meta.tmp.json"
        tmp_meta.write_text(json.dumps(dict(meta, arrays=name)))
        os.replace(tmp_meta, folder / "meta.json")
        for old in folder.glob("state-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """Return (arrays, metadata) of the last checkpoint, or None."""
        folder = self.writer_dir / "checkpoint"
        try:
            meta = json.loads((folder / "meta.json").read_text())
            with np.load(folder / meta["arrays"]) as z:
                arrays = {k.replace("__", "/"): z[k] for k in z.files}
        except FileNotFoundError:
            return None
        return arrays, meta

    def close(self) -> None:
        """Release the writer lock."""
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> "BarStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bars(path: str | os.PathLike, tf: str = "1m") -> xr.Dataset:
    """Open the stored bars of one timeframe (a reader; safe while the writer runs).

    Examples
    --------
    >>> open_bars("data/market.zarr", "2m")
    Traceback (most recent call last):
    ...
    ValueError: unknown timeframe '2m'; choose from 1m, 5m, 15m, 1h, 4h, 1d
    """
    if tf not in TIMEFRAMES:
        raise ValueError(f"unknown timeframe {tf!r}; choose from {', '.join(TIMEFRAMES)}")
    return xr.open_zarr(str(path), group=f"bars/{tf}")  # the consolidated snapshot
