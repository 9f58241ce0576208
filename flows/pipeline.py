"""Wiring only: the streamz graph from feed batches to bars and the store, with named taps.

::

    trades ─▶ validate ─▶ bars ─▶ (in-memory rolling window) ─▶ flusher thread ─▶ Zarr
                 │          │
                 └──────────┴──▶ quarantine tap (records with reasons)

The :class:`Flow` is also what the dashboards read (it implements their ``BarSource``).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from streamz import Stream

from flows.alerts import Alert, AlertEngine, analytics_values
from flows.analytics import Analytics, AnalyticsConfig
from flows.bars import BarConfig, BarEngine, empty_bars_frame
from flows.cache import Cache, CacheConfig
from flows.schema import REASONS, TIMEFRAMES, BarBatch, Quarantine, SymbolTable, TradeBatch
from flows.store import BarStore, writer_dir
from flows.validate import Clock, Counters, ValidateConfig, Validator, wall_clock_ns
from flows.writer import FlushJob, InlineWriter, WriterProcess


@dataclass(frozen=True)
class FlowConfig:
    """Settings of one flow, validated once at the edge (CLI or YAML).

    Parameters
    ----------
    store : Zarr store path, or None to keep bars in memory only.
    timeframes : bar timeframes to build (1m is always built).
    window : minutes late trades may still amend (see :class:`flows.bars.BarConfig`).
    history : bars per timeframe kept in memory.
    flush_interval_s : how often the writer thread persists changes (and analytics refresh).
    max_future_s : trades stamped further ahead of the clock are quarantined.
    analytics : compute indicators, breadth and sectors.
    quality : score data quality per symbol and feed (``quality/{tf}``, ``quality_feed/{tf}``).
    quarantine_spikes : move price spikes to the quarantine instead of flagging them.
    writer : ``"inline"`` (a flush has landed when :meth:`Flow.flush` returns) or
        ``"process"`` (a child process writes the store: nothing of the Zarr work competes
        with the hot path for the GIL; what the CLI uses).
    """

    store: str | None = "data/market.zarr"
    timeframes: tuple[str, ...] = tuple(TIMEFRAMES)
    window: int = 120
    history: int = 500
    flush_interval_s: float = 1.0
    max_future_s: float = 60.0
    feed: str = "simulated"
    checkpoint_keys: int = 200_000
    analytics: bool = True
    quality: bool = True
    quarantine_spikes: bool = False
    #: alert rules (YAML); None: ``alerts.yaml`` in the store's writer folder (no rules file
    #: without a store). Fired alerts are kept in ``alerts.jsonl`` beside the rules.
    alerts: str | None = None
    writer: str = "inline"

    def __post_init__(self) -> None:
        if self.writer not in ("inline", "process"):
            raise ValueError(f"writer must be 'inline' or 'process', got {self.writer!r}")

    def bar_config(self) -> BarConfig:
        return BarConfig(timeframes=self.timeframes, window=self.window, history=self.history)


@dataclass
class StageStats:
    """Throughput and latency figures of the flow (for progress lines and the monitor)."""

    batches: int = 0
    started: float = field(default_factory=time.perf_counter)
    bar_seconds: float = 0.0
    validate_seconds: float = 0.0
    quality_seconds: float = 0.0
    trades: int = 0
    #: receive-to-bar latency samples (ms): up to 16 trades a batch that carry a receive time
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=4000))
    flush_ms: deque = field(default_factory=lambda: deque(maxlen=1000))
    snapshot_ms: deque = field(default_factory=lambda: deque(maxlen=1000))
    last_flush_wall: float = 0.0


class Flow:
    """A running dataflow: push :class:`TradeBatch` objects in, read bars out.

    Parameters
    ----------
    config : flow settings.
    clock : "now" for validation (injected in tests).

    Examples
    --------
    >>> from flows.schema import NS
    >>> flow = Flow(FlowConfig(store=None, timeframes=("1m",)))
    >>> flow.push(TradeBatch.from_columns(flow.table, time=[NS * 60], symbol=["X"],
    ...                                    price=[2.0], size=[1.0]))
    >>> flow.bars("1m", "X")["close"].tolist(), flow.counters.reconciles()
    ([2.0], True)
    """

    def __init__(self, config: FlowConfig | None = None, clock: Clock = wall_clock_ns):
        self.config = config or FlowConfig()
        self.lock = threading.RLock()
        #: the flow's symbol table; feeds register their symbols (and metadata) here.
        self.table = SymbolTable()
        self.store: BarStore | None = None
        checkpoint = None
        if self.config.store is not None:
            self.store = BarStore(self.config.store, self.config.bar_config().timeframes, self.table)
            checkpoint = self.store.load_checkpoint()
            if checkpoint is not None:  # codes index checkpointed arrays: restore their order
                self.table.codes(checkpoint[1]["symbols"])
            self.table.codes(self.store.stored_symbols())
            self.table.meta.update(self.store.root.attrs.get("symbols", {}))
        self.validator = Validator(ValidateConfig(max_future_s=self.config.max_future_s), clock)
        self.engine = BarEngine(self.table, self.config.bar_config())
        #: rows consumed per replayable source at the last push (for exact resume).
        self.positions: dict[str, int] = {}
        if checkpoint is not None:
            arrays, meta = checkpoint
            self.engine.restore({k[len("engine/"):]: v for k, v in arrays.items() if k.startswith("engine/")})
            self.validator.deduper.restore({"hwm": arrays["dedupe/hwm"], "keys": arrays["dedupe/keys"]})
            self.validator.counters = Counters.from_dict(meta["counters"])
            self.positions = {k: int(v) for k, v in meta.get("positions", {}).items()}
        if self.store is not None:  # give the rolling datasets their history back
            stored = self.store.stored_symbols()
            if tuple(stored) == self.table.names[: len(stored)]:
                for tf in self.engine.frames:
                    tail = self.store.read_tail(tf, self.config.history)
                    if tail is not None:
                        self.engine.preload(tf, *tail)
        self.resumed = checkpoint is not None
        self.writer = None
        if self.store is not None:
            if self.config.writer == "process":
                self.store.close()  # the child takes the writer lock over
                self.writer = WriterProcess(str(self.store.path), self.store.timeframes)
            else:
                self.writer = InlineWriter(self.store)
        self._meta_sent: tuple = ()
        self.analytics = (Analytics(self.engine, self.table,
                                    AnalyticsConfig(quarantine_spikes=self.config.quarantine_spikes,
                                                    quality=self.config.quality))
                          if self.config.analytics else None)
        #: flagged trades (spikes, volume outliers, id gaps): not yet persisted, and the latest
        self._pending_flags: list = []
        self.recent_flags: deque = deque(maxlen=200)
        if self.analytics is not None and self.resumed and self.store is not None:
            restored = {tf: int(f.dirty_from) for tf, f in self.engine.frames.items() if f.n}
            ad = {tf: (int(f.times[0]), self.store.value_before(f"breadth/{tf}", "ad_line", int(f.times[0]) + 1))
                  for tf, f in self.engine.frames.items() if f.n}
            self.analytics.resume(restored, {tf: v for tf, v in ad.items() if v[1] is not None})
        self.recent_quarantine: deque = deque(maxlen=10_000)
        #: the read-through cache of the dashboards' reads (keyed by the bars' version, so a
        #: view is computed once per change however many sessions read it)
        self.cache = Cache(CacheConfig(max_entries=4096, max_bytes=256 * 2**20, ttl_s=30.0))
        self._pending_quarantine: list[Quarantine] = []
        self.stats = StageStats()
        self.feed_state = "IDLE"
        #: a live venue feed's health snapshot (set by the feed starter), for the dashboards
        self.feed_health = None
        #: every running feed's health, by feed name (:meth:`register_feed`)
        self.feeds: dict[str, Callable[[], object]] = {}
        self._feed = self.config.feed
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        # The streamz graph: one event per batch.
        self.source = Stream(stream_name="trades")
        accepted = self.source.map(self._validate, stream_name="validate").pluck(0)
        self.taps = {
            "accepted": accepted,
            "quarantine": Stream(stream_name="quarantine"),
            "bars": accepted.map(self._fold, stream_name="bars"),
        }
        self.taps["bars"].sink(lambda _: None)
        #: alert rules and fired alerts (``taps["alerts"]`` emits each one).
        self.alerts = self._open_alerts() if self.analytics is not None else None
        if self.alerts is not None:
            self.taps["alerts"] = self.alerts.stream

    def _open_alerts(self) -> AlertEngine:
        if self.config.alerts is not None:
            rules = Path(self.config.alerts)
        elif self.config.store is not None:
            rules = writer_dir(self.config.store) / "alerts.yaml"
        else:
            return AlertEngine()  # in memory: rules added at runtime, nothing kept
        return AlertEngine.open(rules, rules.with_name("alerts.jsonl"))

    # -- the hot path -------------------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        return self.validator.counters

    def _validate(self, batch: TradeBatch) -> tuple[TradeBatch, Quarantine]:
        t0 = time.perf_counter()
        accepted, quarantine = self.validator.process(batch)
        self._quarantine(quarantine)
        t1 = time.perf_counter()
        self.stats.validate_seconds += t1 - t0
        self.stats.trades += len(batch)
        if self.analytics is not None and self.analytics.quality is not None:
            report = self.analytics.quality.observe(batch, accepted, quarantine, feed=self._feed)
            if len(report.flags):
                self.recent_flags.append(report.flags)
                if self.writer is not None:
                    self._pending_flags.append(report.flags)
            if report.quarantine is not None and report.quarantine.any():
                spikes = accepted.take(report.quarantine)
                accepted = accepted.take(~report.quarantine)
                moved = Quarantine.from_batch(spikes, np.full(len(spikes), REASONS.index("spike")))
                self.validator.quarantine_late(moved)  # accepted -> quarantined, counters reconcile
                self._quarantine(moved)
            self.stats.quality_seconds += time.perf_counter() - t1
        return accepted, quarantine

    def _fold(self, accepted: TradeBatch):
        t0 = time.perf_counter()
        update = self.engine.update(accepted)
        if self.analytics is not None:
            self.analytics.touch(update.touched_from)
        if len(update.too_late):
            self.validator.quarantine_late(update.too_late)
            self._quarantine(update.too_late)
        self.stats.bar_seconds += time.perf_counter() - t0
        recv = accepted.recv_time
        if len(recv) and recv[-1] > 0:  # live feeds stamp their trades on receipt
            now = time.time_ns()
            sample = recv[:: max(1, len(recv) // 16)]
            self.stats.latency_ms.extend(((now - sample[sample > 0]) / 1e6).tolist())
        return update

    def _quarantine(self, q: Quarantine) -> None:
        if len(q):
            self._pending_quarantine.append(q)
            self.taps["quarantine"].emit(q)
            names = self.table.names
            for i in range(max(0, len(q) - 100), len(q)):  # the dashboards show the latest ones
                s = int(q.symbol[i])
                self.recent_quarantine.append((int(q.time[i]), names[s] if 0 <= s < len(names) else "",
                                               REASONS[q.reason[i]], q.raw[i]))

    def push(self, batch: TradeBatch, unparsed: Quarantine | None = None, source: str | None = None,
             rows: int = 0, feed: str | None = None) -> None:
        """Run one batch through the flow (thread-safe).

        ``unparsed`` carries records the feed could not parse; ``source``/``rows`` advance the
        resume position of a replayable source; ``feed`` names the feed the batch came from
        when several feed one flow (default: ``config.feed``), for the per-feed quality score.
        """
        with self.lock:
            self._feed = feed or self.config.feed
            if unparsed is not None and len(unparsed):
                self.validator.quarantine_unparsed(unparsed)
                self._quarantine(unparsed)
                if self.analytics is not None and self.analytics.quality is not None:
                    self.analytics.quality.observe(TradeBatch(), TradeBatch(), Quarantine(),
                                                   feed=self._feed, unparsed=unparsed)
            self.source.emit(batch)
            self.stats.batches += 1
            if source is not None:
                self.positions[source] = self.positions.get(source, 0) + rows

    def push_bars(self, tf: str, bars: BarBatch, unparsed: Quarantine | None = None,
                  source: str | None = None, rows: int = 0) -> None:
        """Run ready-made OHLCV bars of timeframe ``tf`` through validation into the bars
        (``tf`` and every higher timeframe; thread-safe)."""
        with self.lock:
            if unparsed is not None and len(unparsed):
                self.validator.quarantine_unparsed(unparsed)
                self._quarantine(unparsed)
            accepted, quarantine = self.validator.process_bars(bars, tf)
            self._quarantine(quarantine)
            update = self.engine.update_bars(tf, accepted)
            if self.analytics is not None:
                self.analytics.touch(update.touched_from)
            if len(update.too_late):
                self.validator.quarantine_late(update.too_late)
                self._quarantine(update.too_late)
            self.stats.batches += 1
            if source is not None:
                self.positions[source] = self.positions.get(source, 0) + rows

    # -- persistence --------------------------------------------------------------------------

    def flush(self) -> None:
        """Persist changed bars and analytics, new quarantine records and a checkpoint.

        Without a store it evaluates the alert rules and lets the rolling window trim (rows
        are kept until a flush has taken them).
        """
        if self.writer is None:
            self._flush_in_memory()
            return
        t0 = time.perf_counter()
        fired: list[Alert] = []
        with self.lock:  # take a consistent snapshot, write outside the lock
            changes = {f"bars/{tf}": self.engine.take_changes(tf) for tf in self.engine.frames}
            if self.analytics is not None:
                self.analytics.refresh()
                for tf in self.engine.frames:
                    changed = self.analytics.take_changes(tf) or {}
                    changes.update(changed)
                    if self.alerts is not None and changed and self.alerts.rules:
                        since = changed[f"indicators/{tf}"]["time"].values.astype("datetime64[ns]")
                        if len(since):
                            fired += self._evaluate_alerts(tf, int(since.view(np.int64)[0]))
            job = FlushJob(rows={k: v for k, v in changes.items() if v is not None},
                           quarantine=Quarantine.concat(self._pending_quarantine),
                           checkpoint=self._checkpoint_state())
            self._pending_quarantine = []
            if self._pending_flags:
                from flows.quality import QualityFlags

                job.flags = QualityFlags.concat(self._pending_flags)
                self._pending_flags = []
            names = self.table.names
            if (len(names), len(self.table.meta)) != self._meta_sent:
                job.symbols, job.meta = names, {n: dict(self.table.meta.get(n, {})) for n in names}
                self._meta_sent = (len(names), len(self.table.meta))
        self.writer.submit(job)
        if self.alerts is not None:
            self.alerts.emit(fired)  # subscribers run outside the flow lock
        self.stats.flush_ms.extend(self.writer.drain())
        self.stats.snapshot_ms.append((time.perf_counter() - t0) * 1000)
        self.stats.last_flush_wall = time.time()

    def _flush_in_memory(self) -> None:
        fired: list[Alert] = []
        with self.lock:
            self.engine.forget_changes()
            self._pending_quarantine, self._pending_flags = [], []
            if self.analytics is not None:
                evaluate = self.alerts is not None and bool(self.alerts.rules)
                if evaluate:
                    self.analytics.refresh()
                for tf in self.engine.frames:
                    since = self.analytics.take_since(tf)
                    if evaluate and since is not None:
                        fired += self._evaluate_alerts(tf, since)
        if self.alerts is not None:
            self.alerts.emit(fired)
        self.stats.last_flush_wall = time.time()

    def _evaluate_alerts(self, tf: str, since: int) -> list[Alert]:
        """Evaluate the alert rules of ``tf`` from bar time ``since`` (logged, not yet emitted)."""
        times, values, provisional = analytics_values(self.analytics, tf)
        start = int(np.searchsorted(times, since))
        return self.alerts.evaluate(tf, times, values, self.table.names, start, provisional, emit=False)

    def _checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict]:
        # Only bars late trades can still change: older ones are final and in the store.
        arrays = {f"engine/{k}": v for k, v in self.engine.state(amendable_only=True).items()}
        # The newest keys (not the highest: keys sort by symbol code first), without sorting
        # all ~5M of them under the lock.
        dedupe = self.validator.deduper.state(newest=self.config.checkpoint_keys)
        arrays["dedupe/hwm"] = dedupe["hwm"]
        arrays["dedupe/keys"] = dedupe["keys"]
        meta = {"symbols": list(self.table.names), "counters": self.counters.to_dict(),
                "positions": dict(self.positions), "saved_at": time.time()}
        return arrays, meta

    def start_flusher(self) -> None:
        """Persist in a background thread every ``flush_interval_s`` (off the hot path); without
        a store, evaluate alerts and let the window trim."""
        if self._flusher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.config.flush_interval_s):
                self.flush()

        self._flusher = threading.Thread(target=loop, name="tapeflow-flusher", daemon=True)
        self._flusher.start()

    def close(self) -> None:
        """Stop the flusher, flush what is left and release the store."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        if self.writer is not None:
            self.flush()
            self.writer.close()
            self.stats.flush_ms.extend(self.writer.drain())
            self.writer = None

    # -- the dashboards' BarSource protocol ---------------------------------------------------

    def symbols(self) -> list[str]:
        return list(self.table.names)

    def meta(self, symbol: str) -> dict:
        return dict(self.table.meta.get(symbol, {}))

    def timeframes(self) -> tuple[str, ...]:
        return tuple(self.engine.frames)

    def _cached(self, key: tuple, fn: Callable[[], object]):
        """``fn()`` through the cache, keyed by ``key`` and the bars' version."""
        return self.cache.get_or_compute((*key, self.engine.version), fn)

    def bars(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        """The last ``n`` bars of ``symbol`` where it traded (the last may still be forming).

        Read through the cache: treat the frame as read-only (copy it to change it).
        """
        code = self.table.lookup(symbol)
        if code is None:
            return empty_bars_frame()

        def compute() -> pd.DataFrame:
            with self.lock:
                return self.engine.symbol_frame(tf, code, n)

        return self._cached(("bars", tf, symbol, n), compute)

    def _analytics(self, what: str, tf: str, fn: Callable[[], object]):
        if self.analytics is None:
            raise RuntimeError("this flow runs without analytics (FlowConfig(analytics=False))")

        def compute():
            with self.lock:
                self.analytics.refresh()
                return fn()

        return self._cached((what, tf), compute)

    def indicators(self, tf: str) -> xr.Dataset:
        """The indicators of ``tf`` over the rolling window (refreshed first)."""
        return self._analytics("indicators", tf, lambda: self.analytics.indicators_dataset(tf))

    def symbol_indicators(self, tf: str, symbol: str, n: int | None = None) -> pd.DataFrame:
        """One symbol's indicators of ``tf`` on the rows of :meth:`bars` (same index), plus a
        ``provisional`` column (True on the forming bar, whose values still change)."""
        code = self.table.lookup(symbol)
        if code is None or self.analytics is None:
            return pd.DataFrame(index=pd.DatetimeIndex([], name="time"))

        def compute() -> pd.DataFrame:
            with self.lock:
                self.analytics.refresh()
                frame = self.engine.frames[tf]
                times = frame.times[: frame.n]
                bars = self.engine.symbol_frame(tf, code, n)
                rows = np.searchsorted(times, bars.index.asi8)
                out = {}
                for name, values in self.analytics.indicators[tf].outputs().items():
                    if name == "provisional":
                        out[name] = values[rows].astype(bool)
                    elif code < values.shape[1]:
                        out[name] = values[rows, code]
                    else:
                        out[name] = np.full(len(rows), np.nan)
                return pd.DataFrame(out, index=bars.index)

        return self._cached(("symbol_indicators", tf, symbol, n), compute)

    def breadth(self, tf: str) -> xr.Dataset:
        """Market breadth of ``tf`` over the rolling window (refreshed first)."""
        return self._analytics("breadth", tf, lambda: self.analytics.breadth_dataset(tf))

    def sectors(self, tf: str) -> xr.Dataset:
        """Sector figures of ``tf`` over the rolling window (refreshed first)."""
        return self._analytics("sectors", tf, lambda: self.analytics.sectors_dataset(tf))

    def heatmap(self, tf: str) -> pd.DataFrame:
        """Latest returns by sector (symbol, sector, name, return, volume) for a heatmap."""
        from flows.breadth import heatmap_table

        def compute() -> pd.DataFrame:
            names = [self.table.meta.get(n, {}).get("name", "") for n in self.table.names]
            return heatmap_table(self.analytics.breadth[tf], self.table.names, names)

        return self._analytics("heatmap", tf, compute)

    # -- quality and alerts (the Quality and Alerts pages) ------------------------------------

    def quality(self, tf: str) -> xr.Dataset:
        """Quality scores of ``tf`` over ``time × symbol``: ``score`` (0-100) and its named
        components (see :mod:`flows.quality`); empty without quality scoring."""
        if self.analytics is None or self.analytics.quality is None:
            return xr.Dataset(coords={"time": np.array([], "datetime64[ns]"), "symbol": []})
        return self._analytics("quality", tf,
                               lambda: self.analytics.quality.dataset(tf, self.table.names))

    def quality_feeds(self, tf: str) -> xr.Dataset:
        """Quality scores of ``tf`` over ``time × feed`` (same variables as :meth:`quality`)."""
        if self.analytics is None or self.analytics.quality is None:
            return xr.Dataset(coords={"time": np.array([], "datetime64[ns]"), "feed": []})
        return self._analytics("quality_feeds", tf, lambda: self.analytics.quality.feed_dataset(tf))

    def quarantine_log(self, n: int = 1000) -> pd.DataFrame:
        """The latest ``n`` quarantined records, newest first: ``time`` (event time; NaT when
        unparsable), ``symbol``, ``reason``, ``raw`` (the payload as received, for unparsable
        records)."""
        with self.lock:
            rows = list(self.recent_quarantine)[-n:][::-1]
        frame = pd.DataFrame(rows, columns=["time", "symbol", "reason", "raw"])
        t = frame["time"].to_numpy(np.int64, na_value=0) if len(frame) else np.zeros(0, np.int64)
        frame["time"] = pd.to_datetime(np.where(t > 0, t, np.iinfo(np.int64).min).view("datetime64[ns]"))
        return frame

    def alert_rules(self) -> list[dict]:
        """The alert rules: ``id``, ``text`` (the one-line form), ``kind``, ``symbol``, ``tf``."""
        if self.alerts is None:
            return []
        return [{"id": r.id, "text": r.text, "kind": r.kind, "symbol": r.symbol, "tf": r.tf}
                for r in self.alerts.rules]

    def add_alert_rule(self, spec: str) -> dict:
        """Add a rule from its one-line text (e.g. ``* rsi_14 > 70 on 5m``); return it as in
        :meth:`alert_rules`. Raise ValueError with a one-line reason for a bad rule."""
        if self.alerts is None:
            raise ValueError("alerts need analytics (this flow runs without them)")
        with self.lock:
            r = self.alerts.add_rule(spec)
        return {"id": r.id, "text": r.text, "kind": r.kind, "symbol": r.symbol, "tf": r.tf}

    def remove_alert_rule(self, rule_id: str) -> bool:
        """Remove the rule with this id (or text); return whether one was removed."""
        if self.alerts is None:
            return False
        try:
            with self.lock:
                return self.alerts.remove_rule(rule_id)
        except ValueError:  # neither an id nor a rule's text
            return False

    def fired_alerts(self, n: int = 500) -> pd.DataFrame:
        """The latest ``n`` fired alerts, newest first: ``time`` (bar open), ``fired_at``,
        ``symbol``, ``tf``, ``rule``, ``rule_id``, ``kind``, ``value``, ``threshold``, ``message``."""
        columns = ["time", "fired_at", "symbol", "tf", "rule", "rule_id", "kind", "value",
                   "threshold", "message"]

        def compute() -> pd.DataFrame:
            alerts = list(self.alerts.recent)[-n:] if self.alerts is not None else []
            frame = pd.DataFrame([{c: getattr(a, c) for c in columns} for a in alerts[::-1]],
                                 columns=columns)
            for c in ("time", "fired_at"):
                frame[c] = pd.to_datetime(frame[c].to_numpy(np.int64).view("datetime64[ns]"))
            return frame

        # Every open page polls this: built once per change of the alerts, for all of them.
        version = self.alerts.version if self.alerts is not None else 0
        return self.cache.get_or_compute(("fired_alerts", n, version), compute)

    def monitor(self) -> dict:
        """Pipeline figures for the monitor: throughput, each stage's own rate (trades per second
        of its CPU time: validate, quality, bars), receive-to-bar latency p50/p99 (ms, over the
        trades of live feeds, which stamp their receive time), flushes, store size."""
        c, st = self.counters, self.stats
        elapsed = max(time.perf_counter() - st.started, 1e-9)
        flush = np.asarray(st.flush_ms, dtype=float)
        latency = np.asarray(st.latency_ms, dtype=float)

        def rate(seconds: float) -> float | None:  # trades per second of that stage's own time
            return st.trades / seconds if seconds > 0 else None

        return {
            "received": c.received, "accepted": c.accepted, "batches": st.batches,
            "trades_per_s": c.received / elapsed, "bar_stage_s": st.bar_seconds,
            "stage_rates": {"validate": rate(st.validate_seconds), "quality": rate(st.quality_seconds),
                            "bars": rate(st.bar_seconds)},
            "latency_ms_p50": float(np.percentile(latency, 50)) if len(latency) else None,
            "latency_ms_p99": float(np.percentile(latency, 99)) if len(latency) else None,
            "flush_ms_p50": float(np.percentile(flush, 50)) if len(flush) else None,
            "flush_ms_p99": float(np.percentile(flush, 99)) if len(flush) else None,
            "last_flush": st.last_flush_wall, "flushes": len(flush),
            "store": self.config.store,
            "store_bytes": self.store.size_bytes() if self.store is not None else 0,
        }

    def register_feed(self, name: str, health: Callable[[], object]) -> None:
        """Register a running feed's health callable (returning a
        :class:`~flows.feeds.health.FeedHealth` or a dict) under ``name``, for
        :meth:`feed_healths` and the dashboards. The first one also becomes ``feed_health``."""
        self.feeds[name] = health
        if self.feed_health is None:
            self.feed_health = health

    def feed_healths(self) -> list[dict]:
        """One health dict per registered feed (``feed``, ``state``, rates, lag, reconnects,
        gaps, last error): what the Quality page shows."""
        out = []
        for name, health in list(self.feeds.items()):
            d = _as_dict(health())
            d.setdefault("feed", name)
            out.append(d)
        if not out:  # the simulated market or a replay: the flow's own view of its feed
            c = self.counters
            out.append({"feed": self.config.feed, "state": self.feed_state, "received": c.received,
                        "trades": c.received, "reconnects": 0, "gaps": 0, "last_error": None})
        return out

    def version(self) -> int:
        return self.engine.version

    def status(self) -> dict:
        c = self.counters
        return {"feed": self.config.feed, "state": self.feed_state, "received": c.received,
                "accepted": c.accepted, "quarantined": c.quarantined_total, "duplicates": c.duplicates,
                "quarantined_by_reason": dict(c.quarantined), "symbols": len(self.table),
                "store": self.config.store, "last_flush": self.stats.last_flush_wall,
                "health": _as_dict(self.feed_health()) if self.feed_health is not None else None}


def _as_dict(health) -> dict:
    """A feed's health snapshot (a FeedHealth or a dict) as a plain dict."""
    return health.to_dict() if hasattr(health, "to_dict") else dict(health)


_DEFAULT: dict[str, object] = {}
_DEFAULT_LOCK = threading.Lock()


def default_flow(store: str | None = "data/market.zarr", n_symbols: int = 100, rate: float = 2000.0):
    """Return the process-wide simulated flow, starting it on first use (for ``panel serve``).

    Long-lived state lives here, in an imported module, because Bokeh clears a session
    script's globals when the session closes.
    """
    with _DEFAULT_LOCK:
        if "flow" not in _DEFAULT:
            from flows.runner import start_simulated

            flow = Flow(FlowConfig(store=store))
            _DEFAULT["flow"] = flow
            _DEFAULT["thread"] = start_simulated(flow, n_symbols=n_symbols, rate=rate)
        return _DEFAULT["flow"]
