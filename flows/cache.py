"""The read-through cache between the flows and their readers (dashboards, API, notebooks).

It holds latest quotes, recent bars per (symbol, timeframe) and computed views, bounded by an
entry count, optionally by an estimated size in bytes, and by a time to live.

Semantics (named once, in :class:`CacheConfig` and here):

* **Expiry.** An entry stored at clock time ``t`` with time to live ``ttl`` is *expired when
  ``clock() >= t + ttl``*: at exactly ``t + ttl`` it is already gone. Expiry is lazy (a lookup
  that finds an expired entry drops it and counts an expiration) plus :meth:`Cache.expire`, a
  sweep; :meth:`Cache.stats` sweeps first so its figures describe live entries only.
* **Bounds.** After every store, least recently used entries are dropped until the cache holds
  at most ``max_entries`` entries and ``max_bytes`` estimated bytes. A hit refreshes recency; a
  store puts the entry at the most recent end. A dropped entry that had already expired counts
  as an expiration, any other as an eviction. A single value larger than ``max_bytes`` is
  therefore evicted at once (it is returned, never kept).
* **Counting.** Every :meth:`Cache.get` and :meth:`Cache.get_or_compute` call is one lookup and
  exactly one hit or miss, so ``hits + misses == lookups``. ``in`` and :meth:`Cache.stats` are
  not lookups and do not refresh recency.
* **Single flight.** Concurrent :meth:`Cache.get_or_compute` misses on one key run ``fn`` once;
  the other callers wait for its result (each of them counted as a miss). A key invalidated
  while its value is being computed does not get that value stored: it was computed from data
  the invalidation declared stale.
* **Size.** Estimated once, when stored: ``nbytes`` for numpy and xarray objects,
  ``memory_usage(deep=True)`` for pandas, element sizes summed through tuples, lists and dicts,
  ``sys.getsizeof`` otherwise.

One lock guards everything; ``fn`` runs outside it.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
Clock = Callable[[], float]
_MISSING = object()


@dataclass(frozen=True)
class CacheConfig:
    """Bounds and time to live of a :class:`Cache`.

    Parameters
    ----------
    max_entries : most entries kept; least recently used ones are evicted beyond it.
    max_bytes : most estimated bytes kept (``None``: no byte bound).
    ttl_s : default time to live in seconds (``None``: entries never expire); ``ttl=`` on
        :meth:`Cache.set` and :meth:`Cache.get_or_compute` overrides it per entry.
    history : statistics snapshots kept by :meth:`Cache.record_stats` (the Monitor's series).

    Examples
    --------
    >>> CacheConfig(max_entries=1000, max_bytes=64 * 2**20, ttl_s=5.0).ttl_s
    5.0
    >>> CacheConfig(max_entries=0)
    Traceback (most recent call last):
    ...
    ValueError: max_entries must be at least 1, got 0
    """

    max_entries: int = 10_000
    max_bytes: int | None = None
    ttl_s: float | None = 60.0
    history: int = 3600

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive or None, got {self.max_bytes}")
        _check_ttl(self.ttl_s)
        if self.history < 1:
            raise ValueError(f"history must be at least 1, got {self.history}")


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a cache's statistics.

    Parameters
    ----------
    at : clock reading when the snapshot was taken (seconds, the cache's clock).
    entries : live entries.
    hits, misses, lookups : lookup outcomes since creation; ``hits + misses == lookups``.
    hit_rate : ``hits / lookups`` (0.0 before the first lookup).
    evictions : entries dropped by the bounds before they expired.
    expirations : entries dropped because their time to live had passed.
    bytes : estimated size of the live entries' values.
    oldest_age_s : age of the longest-stored live entry (0.0 when empty).
    """

    at: float
    entries: int
    hits: int
    misses: int
    lookups: int
    hit_rate: float
    evictions: int
    expirations: int
    bytes: int
    oldest_age_s: float


class _Entry:
    __slots__ = ("expires", "nbytes", "stored", "value")

    def __init__(self, value: Any, stored: float, expires: float, nbytes: int):
        self.value, self.stored, self.expires, self.nbytes = value, stored, expires, nbytes


class _Flight:
    """One running computation that other callers of the same key wait for."""

    __slots__ = ("done", "error", "owner", "stale", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.owner = threading.get_ident()
        self.stale = False


class Cache:
    """A thread-safe LRU cache with a time to live, a size bound and statistics.

    Keys are hashable; tuples such as ``("bars", "BTCUSDT", "1m")`` let
    :meth:`invalidate_prefix` drop a family of entries at once.

    Parameters
    ----------
    config : bounds and default time to live.
    clock : returns "now" in seconds; monotonic by default, injected in tests.

    Examples
    --------
    >>> now = [0.0]
    >>> cache = Cache(CacheConfig(max_entries=2, ttl_s=10.0), clock=lambda: now[0])
    >>> cache.set(("quote", "AAPL"), 189.5)
    >>> cache.get(("quote", "AAPL"))
    189.5
    >>> now[0] = 10.0                       # exactly at the time to live: expired
    >>> cache.get(("quote", "AAPL"), "gone")
    'gone'
    >>> s = cache.stats()
    >>> s.hits, s.misses, s.lookups, s.expirations, s.entries
    (1, 1, 2, 1, 0)
    """

    def __init__(self, config: CacheConfig | None = None, clock: Clock = time.monotonic):
        self.config = config or CacheConfig()
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._flights: dict[Hashable, _Flight] = {}
        self._bytes = 0
        self._hits = self._misses = self._lookups = 0
        self._evictions = self._expirations = 0
        self._history: deque[CacheStats] = deque(maxlen=self.config.history)

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the live value of ``key``, or ``default``; counts one hit or miss.

        Examples
        --------
        >>> cache = Cache(CacheConfig(ttl_s=None))
        >>> cache.get("spx", 0.0), cache.stats().misses
        (0.0, 1)
        """
        with self._lock:
            value = self._lookup(key, self.clock())
        return default if value is _MISSING else value

    def get_or_compute(self, key: Hashable, fn: Callable[[], T], ttl: float | None = None) -> T:
        """Return the live value of ``key``, computing and storing ``fn()`` on a miss.

        Concurrent misses on one key call ``fn`` once; the other callers wait and get its
        result (or its exception). ``fn`` runs outside the cache's lock, so it may read other
        keys of the cache, but not compute this same key again.

        Parameters
        ----------
        key : the entry.
        fn : computes the value; called with no arguments.
        ttl : time to live of the stored value in seconds (``None``: the config's).

        Examples
        --------
        >>> cache = Cache(CacheConfig(ttl_s=None))
        >>> cache.get_or_compute(("view", "breadth"), lambda: [1, 2, 3])
        [1, 2, 3]
        >>> cache.get_or_compute(("view", "breadth"), lambda: 1 / 0)   # a hit: fn not called
        [1, 2, 3]
        """
        _check_ttl(ttl)
        with self._lock:
            value = self._lookup(key, self.clock())
            if value is not _MISSING:
                return value
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                owner = True
            elif flight.owner == threading.get_ident():
                raise RuntimeError(f"get_or_compute({key!r}) re-entered from its own fn")
            else:
                owner = False
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = fn()
        except BaseException as error:
            flight.error = error
            raise
        else:
            with self._lock:
                if not flight.stale:
                    self._store(key, flight.value, ttl, self.clock())
            return flight.value
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()

    def __contains__(self, key: Hashable) -> bool:
        """Return whether ``key`` holds a live value (not a lookup; recency unchanged)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if self.clock() >= entry.expires:
                self._drop(key, expired=True)
                return False
            return True

    def __len__(self) -> int:
        """Return the number of live entries (expired ones are swept first)."""
        with self._lock:
            self._sweep(self.clock())
            return len(self._entries)

    # -- writing ------------------------------------------------------------------------------

    def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, then evict least recently used entries to the bounds.

        Parameters
        ----------
        key : the entry; an existing value is replaced (and its age restarts).
        value : what to store; its size is estimated now.
        ttl : time to live in seconds (``None``: the config's ``ttl_s``; ``math.inf``: never
            expires).

        Examples
        --------
        >>> import numpy as np
        >>> cache = Cache(CacheConfig(max_entries=10, max_bytes=1000, ttl_s=None))
        >>> cache.set("a", np.zeros(100))           # 800 bytes
        >>> cache.set("b", np.zeros(50))            # 400 more: "a" goes
        >>> "a" in cache, "b" in cache, cache.stats().evictions
        (False, True, 1)
        """
        _check_ttl(ttl)
        with self._lock:
            self._store(key, value, ttl, self.clock())

    def invalidate(self, key: Hashable) -> bool:
        """Drop ``key``; return whether it held a value. A running computation is not stored."""
        with self._lock:
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.stale = True
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def invalidate_prefix(self, prefix: tuple | str) -> int:
        """Drop every key starting with ``prefix``; return how many values were dropped.

        A tuple prefix matches tuple keys whose first elements equal it; a string prefix
        matches string keys that start with it.

        Examples
        --------
        >>> cache = Cache(CacheConfig(ttl_s=None))
        >>> for tf in ("1m", "5m"):
        ...     cache.set(("bars", "BTCUSDT", tf), tf)
        >>> cache.set(("bars", "ETHUSDT", "1m"), "1m")
        >>> cache.invalidate_prefix(("bars", "BTCUSDT")), len(cache)
        (2, 1)
        """
        if isinstance(prefix, str):
            def match(key: Hashable) -> bool:
                return isinstance(key, str) and key.startswith(prefix)
        elif isinstance(prefix, tuple):
            n = len(prefix)

            def match(key: Hashable) -> bool:
                return isinstance(key, tuple) and key[:n] == prefix
        else:
            raise TypeError(f"prefix must be a tuple or a str, not {type(prefix).__name__}")
        with self._lock:
            for key in [k for k in self._flights if match(k)]:
                self._flights.pop(key).stale = True
            keys = [k for k in self._entries if match(k)]
            for key in keys:
                self._drop(key)
            return len(keys)

    def clear(self) -> None:
        """Drop every entry (statistics counters are kept; running computations not stored)."""
        with self._lock:
            for flight in self._flights.values():
                flight.stale = True
            self._flights.clear()
            self._entries.clear()
            self._bytes = 0

    def expire(self) -> int:
        """Drop every expired entry now; return how many were dropped."""
        with self._lock:
            return self._sweep(self.clock())

    # -- statistics ---------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """Return the current statistics (expired entries are swept first).

        Examples
        --------
        >>> now = [100.0]
        >>> cache = Cache(CacheConfig(ttl_s=None), clock=lambda: now[0])
        >>> cache.set("a", 1); now[0] = 103.0; cache.set("b", 2)
        >>> _ = cache.get("a"), cache.get("c")
        >>> s = cache.stats()
        >>> s.entries, s.hits, s.misses, s.hit_rate, s.oldest_age_s
        (2, 1, 1, 0.5, 3.0)
        """
        with self._lock:
            return self._stats()

    def record_stats(self) -> CacheStats:
        """Take a statistics snapshot, append it to :meth:`stats_history` and return it."""
        with self._lock:
            snapshot = self._stats()
            self._history.append(snapshot)
            return snapshot

    def stats_history(self) -> list[CacheStats]:
        """Return the recorded snapshots, oldest first (at most ``config.history`` of them).

        Examples
        --------
        >>> now = [0.0]
        >>> cache = Cache(CacheConfig(history=2), clock=lambda: now[0])
        >>> for t in (1.0, 2.0, 3.0):
        ...     now[0] = t
        ...     _ = cache.record_stats()
        >>> [s.at for s in cache.stats_history()]
        [2.0, 3.0]
        """
        with self._lock:
            return list(self._history)

    # -- internals (called with the lock held) ------------------------------------------------

    def _lookup(self, key: Hashable, now: float) -> Any:
        self._lookups += 1
        entry = self._entries.get(key)
        if entry is not None and now >= entry.expires:
            self._drop(key, expired=True)
            entry = None
        if entry is None:
            self._misses += 1
            return _MISSING
        self._hits += 1
        self._entries.move_to_end(key)
        return entry.value

    def _store(self, key: Hashable, value: Any, ttl: float | None, now: float) -> None:
        ttl = self.config.ttl_s if ttl is None else ttl
        expires = math.inf if ttl is None else now + ttl
        if key in self._entries:
            self._drop(key)
        entry = _Entry(value, now, expires, estimate_nbytes(value))
        self._entries[key] = entry
        self._bytes += entry.nbytes
        max_entries, max_bytes = self.config.max_entries, self.config.max_bytes
        while self._entries and (len(self._entries) > max_entries
                                 or (max_bytes is not None and self._bytes > max_bytes)):
            oldest = next(iter(self._entries))
            expired = now >= self._entries[oldest].expires
            self._drop(oldest, expired=expired)
            if not expired:
                self._evictions += 1

    def _drop(self, key: Hashable, expired: bool = False) -> None:
        self._bytes -= self._entries.pop(key).nbytes
        if expired:
            self._expirations += 1

    def _sweep(self, now: float) -> int:
        keys = [k for k, e in self._entries.items() if now >= e.expires]
        for key in keys:
            self._drop(key, expired=True)
        return len(keys)

    def _stats(self) -> CacheStats:
        now = self.clock()
        self._sweep(now)
        oldest = min((e.stored for e in self._entries.values()), default=now)
        return CacheStats(
            at=now, entries=len(self._entries), hits=self._hits, misses=self._misses,
            lookups=self._lookups, hit_rate=self._hits / self._lookups if self._lookups else 0.0,
            evictions=self._evictions, expirations=self._expirations, bytes=self._bytes,
            oldest_age_s=now - oldest)


def estimate_nbytes(value: Any) -> int:
    """Estimate the memory a cached value holds, in bytes.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> estimate_nbytes(np.zeros(1000))
    8000
    >>> estimate_nbytes(pd.Series(np.zeros(1000))) >= 8000
    True
    >>> estimate_nbytes((np.zeros(10), np.zeros(10))) > 160
    True
    >>> frame = pd.DataFrame({"x": np.zeros(100), "s": ["abc"] * 100})
    >>> estimate_nbytes(frame) == int(frame.memory_usage(deep=True).sum())
    True
    """
    dtypes = getattr(value, "dtypes", None)
    if hasattr(value, "columns") and hasattr(value, "index") and dtypes is not None:
        # A DataFrame: fixed-width numpy columns from their dtype, only the others (objects,
        # strings) inspected (``memory_usage(deep=True)`` of every column: ~1.5 ms a frame).
        n, total = len(value), estimate_nbytes(value.index)
        for i, dtype in enumerate(dtypes):
            fixed = isinstance(dtype, np.dtype) and dtype.kind != "O"
            total += (dtype.itemsize * n if fixed
                      else int(value.iloc[:, i].memory_usage(index=False, deep=True)))
        return total
    memory_usage = getattr(value, "memory_usage", None)
    if callable(memory_usage):  # pandas Series, Index
        try:
            used = memory_usage(deep=True)
        except TypeError:
            pass
        else:
            return int(used.sum()) if hasattr(used, "sum") else int(used)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):  # numpy arrays, xarray Dataset/DataArray
        return nbytes
    if isinstance(value, (tuple, list, set, frozenset)):
        return sys.getsizeof(value) + sum(estimate_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(estimate_nbytes(k) + estimate_nbytes(v)
                                          for k, v in value.items())
    return sys.getsizeof(value)


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be positive or None, got {ttl}")


__all__ = ["Cache", "CacheConfig", "CacheStats", "Clock", "estimate_nbytes"]
