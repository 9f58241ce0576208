"""Cache: expiry at the TTL on a test clock, LRU bounds, statistics, threads, single flight."""
from __future__ import annotations

import itertools
import math
import random
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.cache import Cache, CacheConfig, CacheStats, estimate_nbytes


class ManualClock:
    """A test clock: time moves only when the test says so."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(max_entries: int = 100, max_bytes: int | None = None, ttl_s: float | None = 10.0,
         history: int = 100) -> tuple[Cache, ManualClock]:
    clock = ManualClock()
    return Cache(CacheConfig(max_entries, max_bytes, ttl_s, history), clock=clock), clock


def assert_consistent(s: CacheStats) -> None:
    assert s.hits + s.misses == s.lookups
    assert s.hit_rate == (s.hits / s.lookups if s.lookups else 0.0)


# -- expiry -----------------------------------------------------------------------------------

def test_expiry_is_exactly_at_ttl():
    cache, clock = make(ttl_s=10.0)
    cache.set("AAPL", 189.5)

    clock.advance(9.999)
    one_tick_before = cache.get("AAPL")
    clock.advance(0.001)  # exactly stored + ttl
    at_ttl = cache.get("AAPL", "expired")

    assert one_tick_before == 189.5
    assert at_ttl == "expired"
    s = cache.stats()
    assert (s.hits, s.misses, s.lookups, s.expirations, s.entries) == (1, 1, 2, 1, 0)


def test_expired_entry_is_counted_once():
    cache, clock = make(ttl_s=1.0)
    cache.set("k", 1)
    clock.advance(1.0)

    assert "k" not in cache
    assert cache.get("k") is None
    cache.expire()

    assert cache.stats().expirations == 1


def test_per_entry_ttl_overrides_default():
    cache, clock = make(ttl_s=10.0)
    cache.set("quote", 1, ttl=1.0)
    cache.set("bars", 2)
    cache.set("symbols", 3, ttl=math.inf)

    clock.advance(1.0)
    after_1s = ("quote" in cache, "bars" in cache)
    clock.advance(9.0)
    after_10s = ("bars" in cache, "symbols" in cache)

    assert after_1s == (False, True)
    assert after_10s == (False, True)


def test_no_default_ttl_never_expires():
    cache, clock = make(ttl_s=None)
    cache.set("k", 1)
    cache.set("short", 2, ttl=5.0)
    clock.advance(1e9)

    assert cache.get("k") == 1
    assert "short" not in cache


def test_set_restarts_age_and_ttl():
    cache, clock = make(ttl_s=10.0)
    cache.set("k", 1)
    clock.advance(8.0)
    cache.set("k", 2)
    clock.advance(8.0)

    assert cache.get("k") == 2
    assert cache.stats().oldest_age_s == 8.0


def test_expire_sweeps_only_expired_entries():
    cache, clock = make(ttl_s=10.0)
    cache.set("a", 1, ttl=1.0)
    cache.set("b", 2, ttl=2.0)
    cache.set("c", 3)
    clock.advance(2.0)

    dropped = cache.expire()

    assert dropped == 2
    assert len(cache) == 1
    s = cache.stats()
    assert (s.expirations, s.evictions, s.lookups) == (2, 0, 0)


def test_get_or_compute_recomputes_after_expiry():
    cache, clock = make(ttl_s=5.0)
    calls = []

    def compute():
        calls.append(clock.now)
        return len(calls)

    first = cache.get_or_compute("view", compute)
    clock.advance(4.0)
    hit = cache.get_or_compute("view", compute)
    clock.advance(1.0)
    recomputed = cache.get_or_compute("view", compute)

    assert (first, hit, recomputed) == (1, 1, 2)
    s = cache.stats()
    assert (s.hits, s.misses, s.expirations) == (1, 2, 1)


# -- bounds -----------------------------------------------------------------------------------

def test_eviction_at_max_entries_is_lru():
    cache, _ = make(max_entries=3)
    for key in "abc":
        cache.set(key, key)
    cache.get("a")  # "b" is now the least recently used

    cache.set("d", "d")

    assert [k in cache for k in "abcd"] == [True, False, True, True]
    assert cache.stats().evictions == 1
    assert len(cache) == 3


def test_contains_does_not_refresh_recency_nor_count():
    cache, _ = make(max_entries=2)
    cache.set("a", 1)
    cache.set("b", 2)

    assert "a" in cache
    cache.set("c", 3)

    assert "a" not in cache
    assert cache.stats().lookups == 0


def test_eviction_at_max_bytes_with_numpy_arrays():
    cache, _ = make(max_entries=100, max_bytes=10_000)
    for i in range(4):
        cache.set(i, np.zeros(300))  # 2400 bytes each: 9600 in all
    cache.get(0)

    cache.set(4, np.zeros(300))  # 12000 > 10000: the LRU one (1) goes

    assert [i in cache for i in range(5)] == [True, False, True, True, True]
    s = cache.stats()
    assert (s.entries, s.bytes, s.evictions) == (4, 9600, 1)


def test_value_larger_than_max_bytes_is_not_kept():
    cache, _ = make(max_bytes=1000)
    cache.set("small", np.zeros(10))

    value = cache.get_or_compute("huge", lambda: np.zeros(1000))

    assert value.shape == (1000,)
    assert "huge" not in cache
    assert "small" not in cache  # evicted on the way, oldest first
    s = cache.stats()
    assert (s.entries, s.bytes, s.evictions) == (0, 0, 2)


def test_expired_lru_entry_dropped_by_bound_counts_as_expiration():
    cache, clock = make(max_entries=2, ttl_s=10.0)
    cache.set("old", 1, ttl=1.0)
    cache.set("b", 2)
    clock.advance(1.0)

    cache.set("c", 3)

    s = cache.stats()
    assert (s.expirations, s.evictions, s.entries) == (1, 0, 2)


def test_replacing_a_value_updates_bytes():
    cache, _ = make()
    cache.set("k", np.zeros(100))
    cache.set("k", np.zeros(10))

    assert cache.stats().bytes == 80


# -- invalidation -----------------------------------------------------------------------------

def test_invalidate_and_prefix():
    cache, _ = make(ttl_s=None)
    for sym, tf in itertools.product(("BTCUSDT", "ETHUSDT"), ("1m", "5m")):
        cache.set(("bars", sym, tf), np.zeros(4))
    cache.set(("quote", "BTCUSDT"), 1.0)
    cache.set("view:breadth", 1)
    cache.set("view:sectors", 2)

    assert cache.invalidate(("quote", "BTCUSDT")) is True
    assert cache.invalidate(("quote", "BTCUSDT")) is False
    assert cache.invalidate_prefix(("bars", "BTCUSDT")) == 2
    assert cache.invalidate_prefix("view:") == 2
    assert cache.invalidate_prefix(("bars",)) == 2
    s = cache.stats()
    assert (s.entries, s.bytes, s.evictions, s.expirations) == (0, 0, 0, 0)
    with pytest.raises(TypeError):
        cache.invalidate_prefix(["bars"])


def test_clear_keeps_counters():
    cache, _ = make()
    cache.set("a", np.zeros(8))
    cache.get("a")
    cache.get("b")

    cache.clear()

    s = cache.stats()
    assert (s.entries, s.bytes, s.hits, s.misses, s.lookups) == (0, 0, 1, 1, 2)


# -- statistics -------------------------------------------------------------------------------

def test_stats_snapshot_values():
    cache, clock = make(max_entries=2, ttl_s=10.0)
    cache.set("a", np.zeros(10))          # t = 0
    clock.advance(2.0)
    cache.set("b", np.zeros(20))          # t = 2
    cache.get("a")
    cache.get("a")
    cache.get("zz")
    clock.advance(1.0)
    cache.set("c", np.zeros(5))           # t = 3; evicts "b" (a was used more recently)
    clock.advance(0.5)

    s = cache.stats()

    assert s == CacheStats(at=1003.5, entries=2, hits=2, misses=1, lookups=3, hit_rate=2 / 3,
                           evictions=1, expirations=0, bytes=120, oldest_age_s=3.5)


def test_stats_of_empty_cache():
    cache, clock = make()

    s = cache.stats()

    assert s == CacheStats(at=clock.now, entries=0, hits=0, misses=0, lookups=0, hit_rate=0.0,
                           evictions=0, expirations=0, bytes=0, oldest_age_s=0.0)


def test_stats_history_is_bounded_and_ordered():
    cache, clock = make(history=3)
    for i in range(5):
        cache.set(i, i)
        cache.get(i)
        clock.advance(1.0)
        cache.record_stats()

    history = cache.stats_history()

    assert [s.at for s in history] == [1003.0, 1004.0, 1005.0]
    assert [s.hits for s in history] == [3, 4, 5]
    assert pd.DataFrame(history).columns[0] == "at"  # the Monitor page plots this frame


OPS = ["get"] * 3 + ["set"] * 3 + ["compute"] * 2 + ["contains", "expire", "invalidate", "tick"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 5), st.sampled_from([None, 1.0, 5.0])),
                min_size=20, max_size=100))
def test_matches_a_reference_model(ops):
    """Replay random operations on the cache and on a plain list model of the semantics."""
    cache, clock = make(max_entries=4, ttl_s=3.0)
    model: list[list] = []  # [key, value, expires], least recently used first
    hits = misses = evictions = expirations = 0

    def find(key):
        return next((row for row in model if row[0] == key), None)

    def drop_if_expired(key) -> None:
        nonlocal expirations
        row = find(key)
        if row is not None and clock.now >= row[2]:
            model.remove(row)
            expirations += 1

    for step, (op, key, ttl) in enumerate(ops):
        if op == "tick":
            clock.advance(0.25)
        elif op in ("get", "compute"):
            drop_if_expired(key)
            row = find(key)
            if row is None:
                misses += 1
                expected = step if op == "compute" else None
            else:
                hits += 1
                model.remove(row)
                model.append(row)
                expected = row[1]
            got = (cache.get_or_compute(key, lambda s=step: s, ttl) if op == "compute"
                   else cache.get(key))
            assert got == expected
        if op == "set" or (op == "compute" and row is None):
            if op == "set":
                cache.set(key, step, ttl)
            row = find(key)
            if row is not None:
                model.remove(row)
            model.append([key, step, clock.now + (ttl or 3.0)])
            while len(model) > 4:
                lru = model.pop(0)
                if clock.now >= lru[2]:
                    expirations += 1
                else:
                    evictions += 1
        elif op == "contains":
            drop_if_expired(key)
            assert (key in cache) == (find(key) is not None)
        elif op == "expire":
            live = [row for row in model if clock.now < row[2]]
            expirations += len(model) - len(live)
            model[:] = live
            cache.expire()
        elif op == "invalidate":
            row = find(key)
            if row is not None:
                model.remove(row)
            assert cache.invalidate(key) is (row is not None)

    s = cache.stats()
    expirations += sum(clock.now >= row[2] for row in model)  # stats() sweeps
    assert (s.hits, s.misses, s.evictions, s.expirations) == (hits, misses, evictions, expirations)
    assert s.entries == sum(clock.now < row[2] for row in model)
    assert_consistent(s)


# -- size estimates ---------------------------------------------------------------------------

def test_estimate_nbytes():
    frame = pd.DataFrame({"price": np.zeros(100), "symbol": ["BTCUSDT"] * 100})
    ds = xr.Dataset({"close": (("time", "symbol"), np.zeros((10, 3)))})

    assert estimate_nbytes(np.zeros((10, 10))) == 800
    assert estimate_nbytes(frame) == frame.memory_usage(deep=True).sum()
    assert estimate_nbytes(frame.price) == frame.price.memory_usage(deep=True)
    assert estimate_nbytes(ds) == ds.nbytes
    assert estimate_nbytes(ds["close"]) == 240
    assert estimate_nbytes({"a": np.zeros(10)}) > 80
    assert estimate_nbytes("x" * 1000) == sys.getsizeof("x" * 1000)


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"max_bytes": 0}, {"ttl_s": 0.0},
                                    {"ttl_s": -1.0}, {"ttl_s": math.nan}, {"history": 0}])
def test_config_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError):
        CacheConfig(**kwargs)


def test_per_entry_ttl_must_be_positive():
    cache, _ = make()
    with pytest.raises(ValueError):
        cache.set("k", 1, ttl=0.0)
    with pytest.raises(ValueError):
        cache.get_or_compute("k", lambda: 1, ttl=-1.0)
    assert cache.stats().lookups == 0


# -- single flight ----------------------------------------------------------------------------

def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (thread handoffs need a real wait; no test-clock equivalent)."""
    done = threading.Event()
    for _ in range(int(timeout / 0.001)):
        if predicate():
            return
        done.wait(0.001)
    raise AssertionError("condition not reached")


def run_contended(cache: Cache, fn, n: int = 8):
    """Call ``get_or_compute("view", fn)`` from n threads at once; return results and errors."""
    results, errors = [None] * n, [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = cache.get_or_compute("view", fn)
        except Exception as error:  # noqa: BLE001 - collected for the assertions
            errors[i] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_single_flight_computes_once_under_contention():
    cache, _ = make()
    calls, release = [], threading.Event()

    def compute():
        calls.append(threading.get_ident())
        release.wait(10)
        return object()

    threads, results, errors = run_contended(cache, compute)
    wait_for(lambda: cache.stats().misses == 8)  # every caller has missed: 7 are waiting
    release.set()
    for t in threads:
        t.join()

    assert len(calls) == 1
    assert errors == [None] * 8
    assert all(r is results[0] for r in results)
    s = cache.stats()
    assert (s.misses, s.hits, s.entries) == (8, 0, 1)


def test_single_flight_error_reaches_every_waiter_and_nothing_is_stored():
    cache, _ = make()
    calls, release = [], threading.Event()

    def compute():
        calls.append(1)
        release.wait(10)
        raise KeyError("no bars yet")

    threads, _, errors = run_contended(cache, compute)
    wait_for(lambda: cache.stats().misses == 8)
    release.set()
    for t in threads:
        t.join()

    assert len(calls) == 1
    assert all(isinstance(e, KeyError) for e in errors)
    assert "view" not in cache
    assert cache.get_or_compute("view", lambda: 2) == 2  # the failure is not remembered


def test_invalidate_during_compute_does_not_store_the_stale_value():
    cache, _ = make()
    started, release = threading.Event(), threading.Event()

    def compute():
        started.set()
        release.wait(10)
        return "stale"

    box = []
    worker = threading.Thread(target=lambda: box.append(cache.get_or_compute("view", compute)))
    worker.start()
    started.wait(10)
    cache.invalidate("view")
    release.set()
    worker.join()

    assert box == ["stale"]  # its caller still gets it
    assert "view" not in cache


def test_reentrant_compute_of_the_same_key_raises():
    cache, _ = make()

    def compute():
        return cache.get_or_compute("view", lambda: 1)

    with pytest.raises(RuntimeError, match="re-entered"):
        cache.get_or_compute("view", compute)
    assert cache.get_or_compute("view", lambda: 2) == 2  # the flight was cleaned up


def test_compute_may_read_other_keys():
    cache, _ = make()
    cache.set(("bars", "BTCUSDT"), np.arange(5.0))

    mean = cache.get_or_compute(("view", "mean"), lambda: cache.get(("bars", "BTCUSDT")).mean())

    assert mean == 2.0


# -- threads ----------------------------------------------------------------------------------

class TickingClock:
    """Every reading moves time on by 1 ms (``next`` on a count is atomic) until frozen."""

    def __init__(self) -> None:
        self.ticks = itertools.count()
        self.frozen = False
        self.now = 0.0

    def __call__(self) -> float:
        if not self.frozen:
            self.now = next(self.ticks) * 1e-3
        return self.now


def test_eight_threads_hammering_keep_stats_consistent():
    clock = TickingClock()
    config = CacheConfig(max_entries=64, max_bytes=64 * 800, ttl_s=0.3, history=1000)
    cache = Cache(config, clock=clock)
    n_threads, n_ops = 8, 20_000
    lookups = [0] * n_threads
    errors: list[BaseException] = []
    snapshots: list[CacheStats] = []
    stop = threading.Event()
    barrier = threading.Barrier(n_threads + 1)

    def value_for(key: int) -> np.ndarray:
        return np.full(key % 50 + 50, float(key))  # 400 to 792 bytes

    def worker(i: int) -> None:
        rng = random.Random(i)
        barrier.wait()
        try:
            for _ in range(n_ops):
                key, r = rng.randrange(200), rng.random()
                if r < 0.4:
                    lookups[i] += 1
                    got = cache.get(key)
                    assert got is None or got[0] == key
                elif r < 0.7:
                    lookups[i] += 1
                    got = cache.get_or_compute(key, lambda k=key: value_for(k),
                                               ttl=rng.choice([None, 0.05]))
                    assert got[0] == key
                elif r < 0.95:
                    cache.set(key, value_for(key))
                elif r < 0.98:
                    cache.invalidate(key)
                else:
                    cache.expire()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def monitor() -> None:
        barrier.wait()
        while not stop.wait(0.0005):
            snapshots.append(cache.record_stats())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    watcher = threading.Thread(target=monitor)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads far more often than by default
    try:
        for t in threads:
            t.start()
        watcher.start()
        for t in threads:
            t.join()
        stop.set()
        watcher.join()
    finally:
        sys.setswitchinterval(switch)

    assert errors == []
    clock.frozen = True
    final = cache.stats()
    assert final.lookups == sum(lookups)
    for s in [*snapshots, final]:
        assert_consistent(s)
        assert s.entries <= config.max_entries
        assert s.bytes <= config.max_bytes
    assert final.bytes == sum(estimate_nbytes(cache.get(k)) for k in range(200) if k in cache)
    assert [s.lookups for s in snapshots] == sorted(s.lookups for s in snapshots)
    assert final.evictions > 0 and final.expirations > 0 and final.hits > 0
