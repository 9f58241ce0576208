"""Analytics over the bars: indicators, market breadth and sectors per timeframe.

Wiring only: the engines live in :mod:`flows.indicators` and :mod:`flows.breadth`. After bars
change, :meth:`Analytics.refresh` feeds each timeframe's in-memory rows (from the earliest
changed bar) to its engines, and :meth:`Analytics.take_changes` hands the store the rows whose
figures changed, as Datasets in the contract's layout:

    indicators/{tf}   dims (time, symbol): sma_20 ... volume_sma_20, vwap_session; provisional (time,)
    breadth/{tf}      dims (time,): advancers decliners unchanged ad_line new_highs new_lows ...
    sectors/{tf}      dims (time, sector): return return_vw advancers decliners unchanged volume

Refreshing runs on the flusher's schedule (about once a second), not per batch, so a replay
at full speed pays for it once per flush.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from flows.bars import BarEngine, BarFrame
from flows.breadth import SECTOR_FIELDS, BreadthConfig, BreadthEngine, sectors_of
from flows.indicators import IndicatorConfig, IndicatorEngine
from flows.quality import QualityConfig, QualityEngine
from flows.schema import SymbolTable

_NONE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class AnalyticsConfig:
    """Settings of the analytics stage (periods, breadth look-backs, the session anchor)."""

    indicators: IndicatorConfig = field(default_factory=IndicatorConfig)
    breadth: BreadthConfig = field(default_factory=BreadthConfig)
    quarantine_spikes: bool = False
    #: score data quality (costs ~1 µs a trade on the hot path; off for the fastest replays)
    quality: bool = True


def frame_fields(frame: BarFrame, n_sym: int) -> dict[str, np.ndarray]:
    """The bar fields of a frame's rows as (R, S) arrays (views where possible)."""
    f, k = frame.f[:, : frame.n, :n_sym], frame.k[0, : frame.n, :n_sym]
    with np.errstate(invalid="ignore", divide="ignore"):
        vwap = np.where(k > 0, f[5] / np.where(f[4] == 0, np.nan, f[4]), np.nan)
    return {"open": f[0], "high": f[1], "low": f[2], "close": f[3], "volume": f[4],
            "vwap": vwap, "trades": k}


class Analytics:
    """Indicators, breadth and sector figures for every timeframe of a bar engine.

    Parameters
    ----------
    engine : the bar engine whose rolling window is analysed.
    table : the flow's symbol table (sectors come from its metadata).
    config : periods and look-backs.
    """

    def __init__(self, engine: BarEngine, table: SymbolTable, config: AnalyticsConfig | None = None):
        self.engine, self.table = engine, table
        self.config = config or AnalyticsConfig()
        self.indicators = {tf: IndicatorEngine(self.config.indicators) for tf in engine.frames}
        self.breadth = {tf: BreadthEngine(self.config.breadth, sectors_of(table)) for tf in engine.frames}
        bars = engine.config
        #: fed per batch by the flow (``observe``); its bar rows are judged in :meth:`refresh`
        self.quality = (QualityEngine(QualityConfig(window=bars.window, history=bars.history,
                                                    quarantine_spikes=self.config.quarantine_spikes),
                                      tuple(engine.frames))
                        if self.config.quality else None)
        self._pending = {tf: _NONE for tf in engine.frames}  # earliest bar changed, not yet analysed
        self._changed = {tf: _NONE for tf in engine.frames}  # earliest row changed, not yet stored
        #: added to the A/D line: its value before the first row in memory (after a restart)
        self.ad_offset = {tf: 0 for tf in engine.frames}
        self._sectors_seen = 0
        self._floor: dict[str, int] = {}

    def touch(self, touched_from: dict[str, int]) -> None:
        """Note the earliest bar of each timeframe that a bar update changed."""
        for tf, t in touched_from.items():
            if t < self._pending[tf]:
                self._pending[tf] = t

    def refresh(self) -> None:
        """Bring every timeframe's figures up to date with its bars."""
        n_sym = len(self.table)
        if n_sym != self._sectors_seen:
            sectors = sectors_of(self.table)
            for engine in self.breadth.values():
                engine.set_sectors(sectors)
            self._sectors_seen = n_sym
        for tf, frame in self.engine.frames.items():
            since = self._pending[tf]
            if since == _NONE or frame.n == 0:
                self._quality_changes(tf)  # rejected-only batches change quality, not bars
                continue
            self._pending[tf] = _NONE
            times = frame.times[: frame.n]
            start = int(np.searchsorted(times, since))
            fields = frame_fields(frame, n_sym)
            ind = self.indicators[tf]
            try:
                ind.update(times, fields, start, forming=True)
            except ValueError:  # rows it has never seen (a restart): analyse the window anew
                self.indicators[tf] = ind = IndicatorEngine(self.config.indicators)
                ind.update(times, fields, 0, forming=True)
                start = 0
            out = ind.outputs()
            start = min(start, ind.changed_from)
            breadth = self.breadth[tf]
            breadth.update(times, fields, start, sma={50: out.get("sma_50"), 200: out.get("sma_200")})
            changed = breadth.take_changed()
            first = int(times[min(start, len(times) - 1)])
            if changed is not None:
                first = min(first, changed)
            if self.quality is not None:
                self.quality.update(tf, times, fields, start)
            self._changed[tf] = min(self._changed[tf], first)
            self._quality_changes(tf)

    def _quality_changes(self, tf: str) -> None:
        changed = self.quality.take_changed(tf) if self.quality is not None else None
        if changed is not None:
            self._changed[tf] = min(self._changed[tf], changed)

    # -- reading ------------------------------------------------------------------------------

    def indicators_dataset(self, tf: str, since: int | None = None) -> xr.Dataset:
        """Indicator values of ``tf`` (rows from bar time ``since``, default all in memory)."""
        ind = self.indicators[tf]
        out = ind.outputs()
        times = self.engine.frames[tf].times[: self.engine.frames[tf].n]
        first = 0 if since is None else int(np.searchsorted(times, since))
        n_sym = len(self.table)
        data = {}
        for name, values in out.items():
            if name == "provisional":
                continue
            block = np.full((len(times) - first, n_sym), np.nan)
            block[:, : values.shape[1]] = values[first:]
            data[name] = (("time", "symbol"), block)
        data["provisional"] = ("time", out["provisional"][first:].copy())
        return xr.Dataset(data, coords=_coords(times[first:], symbol=self.table.names))

    def breadth_dataset(self, tf: str, since: int | None = None) -> xr.Dataset:
        """Breadth figures of ``tf`` (dim time)."""
        engine = self.breadth[tf]
        times = engine.times
        first = 0 if since is None else int(np.searchsorted(times, since))
        values = {k: v[first:].copy() for k, v in engine.breadth().items()}
        if "ad_line" in values:
            values["ad_line"] = self._ad_line(tf, engine, values["ad_line"])
        return xr.Dataset({k: ("time", v) for k, v in values.items()}, coords=_coords(times[first:]))

    def sectors_dataset(self, tf: str, since: int | None = None) -> xr.Dataset:
        """Sector figures of ``tf`` (dims time x sector)."""
        engine = self.breadth[tf]
        names, values = engine.sectors()
        times = engine.times
        first = 0 if since is None else int(np.searchsorted(times, since))
        data = {k: (("time", "sector"), values[k][first:].astype(dtype, copy=True))
                for k, dtype in SECTOR_FIELDS.items()}
        return xr.Dataset(data, coords=_coords(times[first:], sector=names))

    def take_since(self, tf: str) -> int | None:
        """The earliest bar time of ``tf`` whose analytics changed since the last call (None:
        nothing changed); the next call starts afresh."""
        since = self._changed[tf]
        if since == _NONE:
            return None
        self._changed[tf] = _NONE
        return max(since, self._floor.get(tf, since))

    def take_changes(self, tf: str) -> dict[str, xr.Dataset] | None:
        """Rows of each analytics group of ``tf`` changed since the last call, for the store."""
        since = self.take_since(tf)
        if since is None:
            return None
        return {f"indicators/{tf}": self.indicators_dataset(tf, since),
                f"breadth/{tf}": self.breadth_dataset(tf, since),
                f"sectors/{tf}": self.sectors_dataset(tf, since),
                **({f"quality/{tf}": self.quality.dataset(tf, self.table.names, since),
                    f"quality_feed/{tf}": self.quality.feed_dataset(tf, since)}
                   if self.quality is not None else {})}

    def resume(self, stored_from: dict[str, int], ad_line: dict[str, tuple[int, float]]) -> None:
        """After a restart: analyse every row in memory, but store only rows from the restored
        window on (``stored_from``, bar time per timeframe; older rows are in the store), and
        continue the A/D line from its stored value at the first row in memory
        (``ad_line[tf] = (bar time, stored value)``)."""
        for tf, frame in self.engine.frames.items():
            if frame.n:
                self._pending[tf] = int(frame.times[0])
        self._floor = dict(stored_from)
        self.refresh()
        for tf, (t, stored) in ad_line.items():  # align the recomputed line with the stored one
            engine = self.breadth[tf]
            row = int(np.searchsorted(engine.times, t))
            if row < len(engine.times) and engine.times[row] == t:
                self.ad_offset[tf] = stored - engine.breadth()["ad_line"][row]

    def _ad_line(self, tf: str, engine: BreadthEngine, values: np.ndarray) -> np.ndarray:
        return values + self.ad_offset[tf]


def _coords(times: np.ndarray, **labels) -> dict:
    coords = {"time": ("time", np.asarray(times, dtype=np.int64).view("datetime64[ns]"))}
    for dim, names in labels.items():
        coords[dim] = (dim, np.asarray(list(names), dtype=object))
    return coords
