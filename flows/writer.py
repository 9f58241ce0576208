"""Persist flushes in a separate process, so store writes never hold the flow's GIL.

The flow takes a consistent snapshot of what changed (under its lock, in memory) and hands it
to :class:`WriterProcess`; the child process owns the :class:`~flows.store.BarStore` (and its
writer lock) and performs the Zarr writes, the publish and the checkpoint. At most ``depth``
flushes wait in the queue: a slow disk slows the flusher thread, never the hot path.

:class:`InlineWriter` does the same work in the calling thread (the library default: a flush
has landed when ``flush()`` returns, which tests and notebooks rely on).
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from flows.schema import Quarantine, SymbolTable
from flows.store import BarStore


@dataclass
class FlushJob:
    """One flush: changed rows per group, new quarantine records, symbol metadata, checkpoint."""

    rows: dict = field(default_factory=dict)
    quarantine: Quarantine = field(default_factory=Quarantine)
    flags: object | None = None  # flows.quality.QualityFlags
    symbols: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    checkpoint: tuple[dict[str, np.ndarray], dict] | None = None


def apply_job(store: BarStore, job: FlushJob) -> float:
    """Write one flush into ``store``; return its duration in ms."""
    t0 = time.perf_counter()
    if job.symbols:
        store.symbols = SymbolTable(job.symbols, job.meta)
        store.write_symbol_meta()
    for key, ds in job.rows.items():
        store.write_rows(key, ds)
    store.write_quarantine(job.quarantine)
    if job.flags is not None:
        store.write_flags(job.flags)
    store.publish()
    if job.checkpoint is not None:
        store.save_checkpoint(*job.checkpoint)
    return (time.perf_counter() - t0) * 1000


class InlineWriter:
    """Write flushes in the calling thread."""

    def __init__(self, store: BarStore):
        self.store = store
        self.flush_ms: list[float] = []

    def submit(self, job: FlushJob) -> None:
        self.flush_ms.append(apply_job(self.store, job))

    def drain(self) -> list[float]:
        out, self.flush_ms = self.flush_ms, []
        return out

    def close(self) -> None:
        self.store.close()


def _next_job(jobs: mp.Queue, parent: int):
    """Wait for the next job; None when told to stop or when the parent is gone."""
    while True:
        try:
            return jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died without saying goodbye
                return None


def _child(path: str, timeframes: tuple[str, ...], jobs: mp.Queue, done: mp.Queue, parent: int) -> None:
    # Ctrl-C and SIGTERM go to the whole process group: the parent decides when we stop (after
    # its final flush), so the child ignores them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = BarStore(path, timeframes, SymbolTable())
    except Exception as exc:  # reported to the parent as one line
        done.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    done.put(("ready", 0.0))
    try:
        while (job := _next_job(jobs, parent)) is not None:
            done.put(("flushed", apply_job(store, job)))
    except Exception as exc:
        done.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        store.close()
        done.put(("closed", 0.0))


class WriterError(RuntimeError):
    """The writer process failed (its one-line reason)."""


class WriterProcess:
    """Write flushes in a child process that owns the store.

    Parameters
    ----------
    path, timeframes : the store to open in the child (the parent must have released it).
    depth : flushes that may wait in the queue before :meth:`submit` blocks.
    """

    def __init__(self, path: str, timeframes: tuple[str, ...], depth: int = 2):
        ctx = mp.get_context("spawn")  # no fork of a process with running threads
        self._jobs: mp.Queue = ctx.Queue(depth)
        self._done: mp.Queue = ctx.Queue()
        self._proc = ctx.Process(target=_child, args=(path, timeframes, self._jobs, self._done, os.getpid()),
                                 name="tapeflow-writer", daemon=False)
        self._proc.start()
        self.flush_ms: list[float] = []
        self._closed = False
        # The child ignores SIGTERM (it goes to the whole process group; the parent decides when
        # the child stops): so the parent always tells it to stop, even on an error exit.
        atexit.register(self.close)
        kind, value = self._done.get(timeout=120)
        if kind == "error":
            self._closed = True
            self._proc.join(timeout=10)
            raise WriterError(value)

    def _collect(self, until_closed: bool = False) -> None:
        while True:
            try:
                kind, value = self._done.get(block=until_closed, timeout=120 if until_closed else 0)
            except queue.Empty:
                if until_closed:
                    raise WriterError("store writer did not finish in 120 s") from None
                return
            if kind == "flushed":
                self.flush_ms.append(value)
            elif kind == "error":
                raise WriterError(f"store writer failed: {value}")
            elif kind == "closed":
                return

    def submit(self, job: FlushJob) -> None:
        self._collect()
        if not self._proc.is_alive():
            raise WriterError("store writer process died")
        self._jobs.put(job)

    def drain(self) -> list[float]:
        self._collect()
        out, self.flush_ms = self.flush_ms, []
        return out

    def close(self) -> None:
        """Let the child finish every queued flush, then stop it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._proc.is_alive():
            self._jobs.put(None)
            self._collect(until_closed=True)
            self._proc.join(timeout=60)
