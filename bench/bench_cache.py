"""Cache throughput: operations per second for get (hit, miss), set and get_or_compute (hit).

``python bench/bench_cache.py [--ops 200000] [--keys 10000] [--threads 1 8]``

Each case runs ``--ops`` operations per thread on a :class:`flows.cache.Cache` with room for
all ``--keys`` keys (tuple keys ``("bars", symbol, timeframe)`` and small numpy values, as the
dashboards use it) and the default monotonic clock. ``set`` replaces existing keys, so it pays
for the size estimate and the bound check but never evicts; ``set (evicting)`` uses a cache
half as large as the key set, so every store evicts one entry. Figures are total operations per
second over all threads: one lock guards the cache and the GIL serialises Python anyway, so 8
threads measure contention, not parallel speed-up.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.cache import Cache, CacheConfig

TIMEFRAMES = ("1m", "5m", "15m", "1h", "4h", "1d")


def make_keys(n: int) -> list[tuple[str, str, str]]:
    """``n`` keys shaped like the dashboards' ``("bars", symbol, timeframe)``."""
    return [("bars", f"SYM{i // len(TIMEFRAMES):05d}", TIMEFRAMES[i % len(TIMEFRAMES)])
            for i in range(n)]


def filled(keys: list, max_entries: int) -> Cache:
    cache = Cache(CacheConfig(max_entries=max_entries, ttl_s=3600.0))
    value = np.zeros(16)
    for key in keys:
        cache.set(key, value)
    return cache


def run(n_threads: int, n_ops: int, body: Callable[[int, int], None]) -> float:
    """Run ``body(thread, n_ops)`` on ``n_threads`` threads at once; return total ops/s."""
    barrier = threading.Barrier(n_threads + 1)

    def worker(i: int) -> None:
        barrier.wait()
        body(i, n_ops)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return n_threads * n_ops / (time.perf_counter() - t0)


def cases(keys: list) -> dict[str, Callable[[], Callable[[int, int], None]]]:
    """Case name -> a factory of a fresh cache and the per-thread loop over it."""
    n = len(keys)
    misses = [("quote", f"NONE{i}") for i in range(n)]
    value = np.zeros(16)

    def get_hit():
        cache = filled(keys, n)

        def body(i: int, n_ops: int) -> None:
            get = cache.get
            for j in range(n_ops):
                get(keys[(i * 7919 + j) % n])
        return body

    def get_miss():
        cache = filled(keys, n)

        def body(i: int, n_ops: int) -> None:
            get = cache.get
            for j in range(n_ops):
                get(misses[(i * 7919 + j) % n])
        return body

    def set_replace():
        cache = filled(keys, n)

        def body(i: int, n_ops: int) -> None:
            put = cache.set
            for j in range(n_ops):
                put(keys[(i * 7919 + j) % n], value)
        return body

    def set_evicting():
        cache = filled(keys[: n // 2], n // 2)

        def body(i: int, n_ops: int) -> None:
            put = cache.set
            for j in range(n_ops):
                put(keys[(i * 7919 + j) % n], value)
        return body

    def compute_hit():
        cache = filled(keys, n)

        def body(i: int, n_ops: int) -> None:
            get_or_compute = cache.get_or_compute
            for j in range(n_ops):
                get_or_compute(keys[(i * 7919 + j) % n], list)
        return body

    return {"get (hit)": get_hit, "get (miss)": get_miss, "set (replace)": set_replace,
            "set (evicting)": set_evicting, "get_or_compute (hit)": compute_hit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200_000, help="operations per thread")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    keys = make_keys(args.keys)
    print(f"cache, {args.keys} keys, {args.ops} ops per thread; total ops/s")
    print(f"  {'operation':22s}" + "".join(f"{f'{n} thread(s)':>16s}" for n in args.threads))
    for name, factory in cases(keys).items():
        rates = [run(n, args.ops, factory()) for n in args.threads]
        print(f"  {name:22s}" + "".join(f"{r:16,.0f}" for r in rates))


if __name__ == "__main__":
    main()
