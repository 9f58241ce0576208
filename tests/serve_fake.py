"""Serve the dashboard over a simulated in-memory FrameSource (browser tests' stand-in for the CLI).

Usage: ``python tests/serve_fake.py --port PORT``; prints ``serving on http://127.0.0.1:PORT``
once the server listens. A thread upserts bars every 300 ms (a new bar every 4th tick); the
source's analytics go through a :class:`flows.cache.Cache`, so the monitor page shows its stats.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.app import serve
from dashboards.source import FrameSource
from flows.cache import Cache, CacheConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5006)
    parser.add_argument("--symbols", type=int, default=20)
    args = parser.parse_args()
    source = FrameSource.synthetic(args.symbols, n_bars=120, empty=["EMPTY"])
    source.symbol_indicators("1m", source.symbols()[0])  # load the numba kernels before serving
    source.cache = Cache(CacheConfig(max_entries=64, ttl_s=30.0))  # charted on the monitor page
    source.simulate(period=0.3, bar_every=4)
    server = serve(source, port=args.port, threaded=True)
    print(f"serving on http://127.0.0.1:{args.port}", flush=True)
    server.join()


if __name__ == "__main__":
    main()
