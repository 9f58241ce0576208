"""Drive feeds through a :class:`~flows.pipeline.Flow`: live threads and file replays."""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from flows.feeds import FeedError
from flows.pipeline import Flow
from flows.schema import BarBatch, TradeBatch


def start_simulated(flow: Flow, n_symbols: int = 100, rate: float = 2000.0, seed: int = 0,
                    realtime: bool = True, duration_s: float | None = None,
                    backfill_s: float = 0.0, stop: threading.Event | None = None) -> threading.Thread:
    """Run the simulated market into ``flow`` in a daemon thread; the flusher persists it.

    With ``realtime`` the tape starts ``backfill_s`` seconds in the past, replays that stretch
    as fast as possible (so charts open with history), then follows the wall clock. Without
    it the whole ``duration_s`` (default one day) is generated at full speed, ending now.
    """
    from flows.feeds.simulated import SimulatedMarket

    now = time.time_ns()
    span = backfill_s if realtime else (duration_s if duration_s is not None else 86400.0)
    start_ns = (now - int(span * 1e9)) // 60_000_000_000 * 60_000_000_000 if span else now // 10**9 * 10**9
    market = SimulatedMarket(flow.table, n_symbols=n_symbols, rate=rate, seed=seed, realtime=False,
                             start_ns=start_ns)
    # Breadth and returns compare with the previous session's close: when the history starts in
    # today's session, open with the last five minutes of yesterday's (quietly, same listing).
    day = 86_400 * 10**9
    previous = None
    if realtime and span and start_ns // day == now // day:
        previous = SimulatedMarket(flow.table, n_symbols=n_symbols, rate=min(rate, 500.0), seed=seed + 1,
                                   realtime=False, start_ns=now // day * day - 300 * 10**9)
    stop = stop or threading.Event()

    def history(batches: list[TradeBatch]) -> TradeBatch:
        # History is generated, not received: no receive time (kept out of the latency figures).
        batch = TradeBatch.concat(batches)
        return replace(batch, recv_time=np.zeros(len(batch), np.int64))

    def loop() -> None:
        flow.feed_state = "BACKFILL" if realtime and span else "LIVE"
        if previous is not None:
            flow.push(history(list(previous.batches(300))))
        pending: list = []
        end = market.start_ns
        try:
            for batch in market.batches(duration_s):
                if stop.is_set():
                    break
                end += market.batch_ns
                if realtime and end > time.time_ns():  # caught up: follow the wall clock
                    if pending:
                        flow.push(history(pending))
                        pending = []
                    flow.feed_state = "LIVE"
                    if stop.wait(max(0.0, (end - time.time_ns()) / 1e9)):
                        break
                    # stamped on "receipt", as a venue feed does: the monitor's receive-to-bar latency
                    flow.push(replace(batch, recv_time=np.full(len(batch), time.time_ns(), np.int64)))
                else:  # history: push in large batches
                    pending.append(batch)
                    if len(pending) >= 50:
                        flow.push(history(pending))
                        pending = []
            if pending:
                flow.push(history(pending))
        finally:
            flow.feed_state = "STOPPED"

    flow.start_flusher()
    thread = threading.Thread(target=loop, name="tapeflow-simulated", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread


def prefetch(items, depth: int = 4):
    """Iterate ``items`` in a background thread, ``depth`` ahead, so parsing the next batch
    (Arrow decoding releases the GIL) overlaps folding this one."""
    q: queue.Queue = queue.Queue(depth)
    end = object()

    def run() -> None:
        try:
            for item in items:
                q.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(_Raised(exc))
        finally:
            q.put(end)

    threading.Thread(target=run, name="tapeflow-prefetch", daemon=True).start()
    while (item := q.get()) is not end:
        if isinstance(item, _Raised):
            raise item.exc
        yield item


@dataclass
class _Raised:
    exc: BaseException


def check_readable(name: str) -> Path:
    """Return ``name`` as a Path, or raise :class:`FeedError` saying why it cannot be read."""
    path = Path(name)
    if not path.exists():
        raise FeedError(f"{name}: no such file")
    if not path.is_file():
        raise FeedError(f"{name}: not a file")
    if not os.access(path, os.R_OK):
        raise FeedError(f"{name}: permission denied")
    return path


def source_key(path: Path) -> str:
    """Identify a replay file for resume: its absolute path and size."""
    return f"{path.resolve()}:{path.stat().st_size}"


@dataclass
class ReplaySummary:
    """What a replay did, for the closing report."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    skipped_rows: int = 0
    seconds: float = 0.0
    ignored: dict[str, int] = field(default_factory=dict)

    def trades_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


class Progress:
    """One status line on a terminal (rewritten in place), or a line every few seconds otherwise."""

    def __init__(self, out: TextIO | None = None, every_s: float = 1.0):
        self.out = out if out is not None else sys.stderr  # the stream of the moment, not of import
        self.every_s = every_s
        self.tty = self.out.isatty()
        self._last = 0.0
        if not self.tty:
            self.every_s = max(every_s, 5.0)

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if self.tty:
            self.out.write("\r\033[K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def replay_files(flow: Flow, paths: list[str], fmt: str | None = None, time_unit: str | None = None,
                 speed: float | None = None, progress: Progress | None = None,
                 stop: threading.Event | None = None, bars: str | None = None) -> ReplaySummary:
    """Replay recorded files through ``flow``, resuming after the store's last checkpoint.

    A file already partly replayed into this store (same path and size) continues where the
    checkpoint left off, so a stopped replay restarted ends with the same bars as one run.
    With ``bars`` (a timeframe) the files hold ready-made OHLCV bars of that timeframe.
    """
    from flows.feeds.replay import Replayer

    summary = ReplaySummary()
    t0 = time.perf_counter()
    flush_every = max(flow.config.flush_interval_s, 2.0)
    next_flush = time.monotonic() + flush_every
    flow.feed_state = "REPLAY"
    for name in paths:
        path = check_readable(name)
        key = source_key(path)
        done = flow.positions.get(key, 0)
        replayer = Replayer([str(path)], flow.table, format=fmt, time_unit=time_unit, speed=speed,
                            bars=bars is not None)
        summary.files.append(name)
        skipped = 0
        for batch, unparsed in prefetch(replayer):
            if stop is not None and stop.is_set():
                break
            rows = len(batch) + len(unparsed)
            if skipped < done:  # already in the store (resume after a stop)
                skipped += rows
                if skipped > done:
                    raise FeedError(f"{name}: the store's checkpoint does not match this file's "
                                    "batches; replay into a fresh store (--fresh)")
                continue
            if isinstance(batch, BarBatch):  # bar files, or a venue's minute bars (Polygon AM)
                flow.push_bars(bars or "1m", batch, unparsed, source=key, rows=rows)
            else:
                flow.push(batch, unparsed, source=key, rows=rows)
            if time.monotonic() >= next_flush:  # persist as we go: memory stays bounded
                flow.flush()
                next_flush = time.monotonic() + flush_every
            summary.rows += rows
            if progress is not None:
                elapsed = time.perf_counter() - t0
                total = getattr(replayer, "total_rows", None)
                pct = f" ({100 * (skipped + summary.rows) / total:.0f}%)" if total else ""
                progress.update(f"replay {path.name}: {skipped + summary.rows:,} rows{pct}, "
                                f"{summary.rows / max(elapsed, 1e-9) / 1e6:.2f}M rows/s, "
                                f"{flow.counters.quarantined_total:,} quarantined")
        summary.skipped_rows += skipped
        for k, v in getattr(replayer, "ignored", {}).items():
            summary.ignored[k] = summary.ignored.get(k, 0) + v
    summary.seconds = time.perf_counter() - t0
    if progress is not None:
        progress.done()
    return summary


def bar_counts(flow: Flow) -> dict[str, tuple[int, int]]:
    """Per timeframe: (bar times, non-empty bars) in the store, or in memory without a store."""
    import zarr

    out = {}
    for tf in flow.engine.frames:
        if flow.store is not None:
            try:
                trades = zarr.open_array(str(flow.store.path / "bars" / tf / "trades"), mode="r")[:]
            except FileNotFoundError:
                trades = np.zeros((0, 0), dtype=np.int64)
            out[tf] = (trades.shape[0], int(np.count_nonzero(trades)))
        else:
            ds = flow.engine.dataset(tf)
            out[tf] = (ds.sizes["time"], int((ds.trades.values > 0).sum()))
    return out


def format_summary(flow: Flow, summary: ReplaySummary | None = None,
                   echo: Callable[[str], None] = print) -> None:
    """Print the reconciliation: received = accepted + quarantined + duplicates, and bars."""
    c = flow.counters
    echo(f"received     {c.received:>14,}")
    echo(f"accepted     {c.accepted:>14,}")
    echo(f"quarantined  {c.quarantined_total:>14,}")
    for reason, n in sorted(c.quarantined.items()):
        echo(f"  {reason:<22}{n:>8,}")
    echo(f"duplicates   {c.duplicates:>14,}")
    echo("reconciles   " + ("yes" if c.reconciles() else "NO"))
    for tf, (rows, bars) in bar_counts(flow).items():
        echo(f"bars {tf:<4}    {bars:>14,}  ({rows:,} bar times)")
    if summary is not None:
        if summary.skipped_rows:
            echo(f"resumed: skipped {summary.skipped_rows:,} rows already in the store")
        for k, v in sorted(summary.ignored.items()):
            echo(f"ignored {k} frames: {v:,}")
        echo(f"rate         {summary.trades_per_s():>14,.0f} rows/s ({summary.rows:,} rows in {summary.seconds:.2f} s)")
