"""The only writer of the Zarr store: bars per timeframe, the quarantine log and checkpoints.

Layout (Zarr v3, see README "Store layout")::

    market.zarr/
      bars/{tf}        dims (time, symbol): open high low close volume trades vwap
      quarantine       dim (record,): time symbol price size trade_id reason raw
      _checkpoint/     engine state to resume exactly after a stop (not a Zarr group)
      .lock            held by the one writer process

Writes go straight to the Zarr arrays: the changed tail of each timeframe (from the earliest
amended bar to the newest) is written over the stored rows, the rest appended. ``time`` is
stored as int64 nanoseconds with CF units, so xarray decodes it to ``datetime64[ns]``.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from flows.schema import BAR_FIELDS, REASONS, TIMEFRAMES, Quarantine, SymbolTable

TIME_UNITS = "nanoseconds since 1970-01-01"
CHUNK_TIME = 256
CHUNK_SYMBOLS = 512
_FILL = {"volume": 0.0, "trades": 0}
QUARANTINE_FIELDS = ("time", "symbol", "price", "size", "trade_id", "reason", "raw")


class StoreError(Exception):
    """A store problem a user can act on (one line)."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


def bars_encoding(ds: xr.Dataset) -> dict:
    """Return the Zarr encoding for a bars dataset: integer time, chunking, fill values."""
    enc = {"time": {"dtype": "int64", "units": TIME_UNITS, "calendar": "proleptic_gregorian",
                    "chunks": (CHUNK_TIME,)}}
    for name in ds.data_vars:
        enc[name] = {"chunks": (CHUNK_TIME, CHUNK_SYMBOLS)}
        if name in _FILL:
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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.path}: {exc.strerror}") from None
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory")
        self._lock_file = open(self.path / ".lock", "a+")
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
        self._times: dict[str, np.ndarray] = {}
        self._symbols: dict[str, list[str]] = {}
        for tf in timeframes:
            key = f"bars/{tf}"
            if key in self.root:
                g = self.root[key]
                self._times[tf] = np.asarray(g["time"][:], dtype=np.int64)
                self._symbols[tf] = [str(s) for s in g["symbol"][:]]
        self.flushes = 0
        self.last_flush_ns = 0

    # -- bars -------------------------------------------------------------------------------

    def stored_symbols(self) -> list[str]:
        """Symbols stored in the 1m bars (the store's symbol order)."""
        return list(self._symbols.get("1m", []))

    def stored_times(self, tf: str) -> np.ndarray:
        """Bar times stored for ``tf`` (cached; the writer is the only one changing them)."""
        return self._times.get(tf, np.empty(0, dtype=np.int64))

    def write_bars(self, tf: str, changes: xr.Dataset) -> None:
        """Replace the stored bars from ``changes``' first time onwards with ``changes``.

        ``changes`` holds every in-memory bar from the earliest changed one to the newest, so
        amended bars are rewritten in place and new ones appended; rows are never duplicated.
        """
        if changes is None or changes.sizes["time"] == 0:
            return
        with self._mutex:
            times = changes["time"].values.view("int64")
            names = [str(s) for s in changes["symbol"].values]
            key = f"bars/{tf}"
            if tf not in self._times:
                changes.to_zarr(str(self.path), group=key, mode="w", zarr_format=3,
                                consolidated=False, encoding=bars_encoding(changes))
                self._times[tf] = times.copy()
                self._symbols[tf] = names
                return
            g = self.root[key]
            stored_names = self._symbols[tf]
            new_names = [n for n in names if n not in set(stored_names)]
            all_names = stored_names + new_names
            col = {n: i for i, n in enumerate(all_names)}
            order = np.array([col[n] for n in names], dtype=np.int64)
            stored = self._times[tf]
            start = int(np.searchsorted(stored, times[0]))
            length = start + len(times)
            n_sym = len(all_names)
            for name in BAR_FIELDS:
                arr = g[name]
                values = changes[name].values
                if arr.shape != (length, n_sym):
                    arr.resize((length, n_sym))
                block = np.full((len(times), n_sym), _FILL.get(name, np.nan), dtype=arr.dtype)
                block[:, order] = values
                if len(names) < len(stored_names):  # columns not in changes keep stored values
                    missing = np.setdiff1d(np.arange(len(stored_names)), order)
                    old_rows = min(len(stored), length) - start
                    if old_rows > 0:
                        block[:old_rows, missing] = arr[start : start + old_rows, :][:, missing]
                arr[start:length, :] = block
            if new_names:
                sym = g["symbol"]
                sym.resize((n_sym,))
                sym[len(stored_names):] = np.array(new_names, dtype=object)
                self._symbols[tf] = all_names
            tarr = g["time"]
            if tarr.shape != (length,):
                tarr.resize((length,))
            tarr[start:length] = times
            self._times[tf] = np.concatenate([stored[:start], times])

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
        names = np.asarray(self.symbols.names + ("",), dtype=object)
        columns = {
            "time": q.time,
            "symbol": names[np.where(q.symbol >= 0, q.symbol, len(names) - 1)].astype(object),
            "price": q.price, "size": q.size, "trade_id": q.trade_id,
            "reason": np.asarray(REASONS, dtype=object)[q.reason.astype(np.int64)],
            "raw": np.asarray(q.raw, dtype=object),
        }
        with self._mutex:
            if "quarantine" not in self.root:
                ds = xr.Dataset({k: ("record", v) for k, v in columns.items() if k != "time"},
                                coords={"time": ("record", q.time.view("datetime64[ns]"))})
                ds.to_zarr(str(self.path), group="quarantine", mode="w", zarr_format=3, consolidated=False,
                           encoding={"time": {"dtype": "int64", "units": TIME_UNITS,
                                              "calendar": "proleptic_gregorian", "chunks": (65536,)}})
                return
            g = self.root["quarantine"]
            n0 = g["reason"].shape[0]
            for k, v in columns.items():
                arr = g[k]
                arr.resize((n0 + len(q),))
                arr[n0:] = v

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Atomically save the state needed to resume (arrays + JSON metadata).

        The arrays go to a new file first; ``meta.json`` naming that file then replaces the
        old one in a single rename, so a stop at any moment leaves a consistent pair.
        """
        folder = self.path / "_checkpoint"
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
        folder = self.path / "_checkpoint"
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
    >>> ds = open_bars("data/market.zarr", "1m")  # doctest: +SKIP
    """
    if tf not in TIMEFRAMES:
        raise ValueError(f"unknown timeframe {tf!r}; choose from {', '.join(TIMEFRAMES)}")
    return xr.open_zarr(str(path), group=f"bars/{tf}", consolidated=False)
