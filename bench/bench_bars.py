"""Bar-stage and end-to-end throughput on a recorded day: 10M trades, 500 symbols, 6 timeframes.

Run ``make bench`` (or ``python bench/bench_bars.py --trades 1000000`` for a quick look). In one
run it prints:

* the stages of ``tapeflow replay`` measured apart -- Parquet parse, validation, and the bar
  stage (``BarEngine.update`` over the batches the Replayer yields, all six timeframes);
* pandas (``floor`` + ``groupby``, and ``groupby().resample()``) and polars ``group_by``
  computing the same six timeframes' OHLCV + trades + vwap from the same in-memory trades;
* a cross-check that our 1m bars equal pandas' (OK / MISMATCH);
* end to end: ``tapeflow replay FILE --store bench/out/bench.zarr --fresh`` in-process
  (:func:`flows.runner.replay_files` + ``flow.close()``), in a child process so its peak RSS
  is its own.

The tape is generated once (seeded) by the simulated market -- one 6.5 h session, sorted by
time, then put in arrival order (receive time, so trades a few hundred microseconds apart swap)
with a few late prints -- and written to ``bench/out/`` (gitignored), reused when present.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.bars import BarConfig, BarEngine
from flows.schema import NS, TIMEFRAMES, SymbolTable, TradeBatch

OUT = ROOT / "bench" / "out"
SESSION_S = 23_400  # 6.5 h
START_NS = 1_710_509_400 * NS  # 2024-03-15 13:30 UTC, a US open
SEED = 42
LATE_SHARE, LATE_MAX_S = 5e-4, 5.0  # late prints: share of trades, and how late at most
FREQ = {"1m": "1min", "5m": "5min", "15m": "15min", "1h": "1h", "4h": "4h", "1d": "1D"}


def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM, which (unlike ``ru_maxrss``) is not inherited over exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --------------------------------------------------------------------------- the tape

def tape_path(n_trades: int, n_symbols: int) -> Path:
    return OUT / f"trades_{n_trades}_{n_symbols}_s{SEED}.parquet"


def make_tape(n_trades: int, n_symbols: int) -> Path:
    """Generate the tape (once) and write it as Parquet; return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.feeds.simulated import SimulatedMarket

    path = tape_path(n_trades, n_symbols)
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = SymbolTable()
    market = SimulatedMarket(table, n_symbols=n_symbols, rate=1.03 * n_trades / SESSION_S,
                             seed=SEED, start_ns=START_NS, batch_ms=1000)
    parts, have = [], 0
    while have < n_trades:  # a calm day may fall short of the mean rate: keep trading
        chunk = TradeBatch.concat(list(market.batches(600.0)))
        parts.append(chunk)
        have += len(chunk)
    trades = TradeBatch.concat(parts).take(slice(0, n_trades))
    # Arrival order: by receive time (trades within a few hundred us swap), and a few late
    # prints (reporting delays) that arrive up to LATE_MAX_S after their event time.
    rng = np.random.default_rng(SEED)
    arrival = trades.recv_time.copy()
    late = rng.random(len(arrival)) < LATE_SHARE
    arrival[late] += (rng.random(int(late.sum())) * LATE_MAX_S * NS).astype(np.int64)
    trades = trades.take(np.argsort(arrival, kind="stable"))
    names = np.asarray(table.names, dtype=object)
    tbl = pa.table({
        "time": pa.array(trades.time, pa.timestamp("ns", tz="UTC")),
        "symbol": pa.array(names[trades.symbol], pa.string()),
        "price": trades.price, "size": trades.size, "trade_id": trades.trade_id,
        "side": pa.array(np.where(trades.side > 0, "buy", "sell"), pa.string()),
        # int64 ns: a timestamp-typed recv_time trips flows.feeds.replay (read-only array)
        "recv_time": trades.recv_time,
    })
    tmp = path.with_suffix(".tmp")
    pq.write_table(tbl, tmp, row_group_size=1_000_000, compression="zstd")
    os.replace(tmp, path)
    swapped = int((np.diff(trades.time) < 0).sum())
    print(f"generated {path.name}: {n_trades:,} trades, {swapped:,} out of time order, "
          f"{path.stat().st_size / 2**20:.0f} MiB, in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


# --------------------------------------------------------------------------- our stages

def read_batches(path: Path) -> tuple[SymbolTable, list[TradeBatch], float]:
    """Parse the file exactly as ``tapeflow replay`` does; return the batches and the time."""
    from flows.feeds.replay import Replayer

    table = SymbolTable()
    t0 = time.perf_counter()
    batches = []
    for batch, unparsed in Replayer([str(path)], table):
        assert len(unparsed) == 0
        batches.append(batch)
    return table, batches, time.perf_counter() - t0


def validate(batches: list[TradeBatch]) -> tuple[list[TradeBatch], float]:
    from flows.validate import Validator

    v = Validator()
    t0 = time.perf_counter()
    out = [v.process(b)[0] for b in batches]
    seconds = time.perf_counter() - t0
    assert v.counters.reconciles() and v.counters.accepted == sum(map(len, batches))
    return out, seconds


def bar_stage(table: SymbolTable, batches: list[TradeBatch]) -> tuple[BarEngine, float]:
    engine = BarEngine(table, BarConfig())
    t0 = time.perf_counter()
    for b in batches:
        engine.update(b)
    return engine, time.perf_counter() - t0


def warm_up(table: SymbolTable, batch: TradeBatch) -> None:
    """Compile (or load from cache) the numba kernels outside the timed runs."""
    BarEngine(table, BarConfig()).update(batch.take(slice(0, 1000)))


# --------------------------------------------------------------------------- baselines

def trades_frame(table: SymbolTable, batches: list[TradeBatch]):
    """All trades as one DataFrame in bar order (event time, then trade id, then arrival).

    The baselines get the trades pre-sorted (the sort is timed apart): pandas' and polars'
    ``first``/``last`` take row order, and the tape arrives out of order.
    """
    import pandas as pd

    t = TradeBatch.concat(batches)
    t0 = time.perf_counter()
    order = np.lexsort((t.trade_id, t.time))  # stable: ties keep arrival order
    t = t.take(order)
    sort_s = time.perf_counter() - t0
    df = pd.DataFrame({"time": t.time.view("datetime64[ns]"),
                       "symbol": pd.Categorical.from_codes(t.symbol, categories=list(table.names)),
                       "price": t.price, "size": t.size})
    df["pv"] = df["price"] * df["size"]
    return df, sort_s


def pandas_floor(df) -> dict:
    out = {}
    for tf, freq in FREQ.items():
        g = df.groupby([df["time"].dt.floor(freq), "symbol"], observed=True, sort=True)
        bars = g.agg(open=("price", "first"), high=("price", "max"), low=("price", "min"),
                     close=("price", "last"), volume=("size", "sum"), trades=("price", "count"),
                     pv=("pv", "sum"))
        bars["vwap"] = bars.pop("pv") / bars["volume"]
        out[tf] = bars
    return out


def pandas_resample(df) -> dict:
    out = {}
    indexed = df.set_index("time")
    for tf, freq in FREQ.items():
        r = indexed.groupby("symbol", observed=True).resample(freq)
        bars = r.agg({"price": ["first", "max", "min", "last", "count"], "size": "sum", "pv": "sum"})
        bars.columns = ["open", "high", "low", "close", "trades", "volume", "pv"]
        bars = bars[bars["trades"] > 0]
        bars["vwap"] = bars.pop("pv") / bars["volume"]
        out[tf] = bars
    return out


def polars_frame(df):
    """The same trades as a polars DataFrame (converted outside the timed run)."""
    import polars as pl

    return pl.from_pandas(df[["time", "price", "size", "pv"]]).with_columns(
        symbol=pl.Series(df["symbol"].cat.codes.to_numpy()))


def polars_group_by(pf) -> dict:
    import polars as pl

    every = {"1m": "1m", "5m": "5m", "15m": "15m", "1h": "1h", "4h": "4h", "1d": "1d"}
    out = {}
    for tf, e in every.items():
        out[tf] = (pf.group_by(pl.col("time").dt.truncate(e).alias("bucket"), "symbol")
                   .agg(open=pl.col("price").first(), high=pl.col("price").max(),
                        low=pl.col("price").min(), close=pl.col("price").last(),
                        volume=pl.col("size").sum(), trades=pl.len(), pv=pl.col("pv").sum())
                   .with_columns(vwap=pl.col("pv") / pl.col("volume")).drop("pv"))
    return out


def timed(fn, *args, repeat: int = 2) -> tuple[object, list[float]]:
    times, result = [], None
    for _ in range(repeat):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return result, times


def cross_check(engine: BarEngine, ref: dict, tfs=("1m", "1h")) -> dict[str, str]:
    """Compare our bars with pandas' (exact OHLC and counts; volume/vwap to 1e-9 relative)."""
    import pandas as pd

    verdicts = {}
    for tf in tfs:
        ds = engine.dataset(tf)
        frame = ds.to_dataframe()
        ours = frame[frame["trades"] > 0].copy()
        theirs = ref[tf].copy()
        theirs.index = theirs.index.set_names(["time", "symbol"])
        theirs.index = theirs.index.set_levels(theirs.index.levels[1].astype(str), level=1)
        ours.index = pd.MultiIndex.from_arrays([ours.index.get_level_values("time"),
                                                ours.index.get_level_values("symbol").astype(str)],
                                               names=["time", "symbol"])
        ours, theirs = ours.sort_index(), theirs.sort_index()
        problems = []
        if not ours.index.equals(theirs.index):
            problems.append(f"{len(ours)} bars vs {len(theirs)}")
        else:
            for c in ("open", "high", "low", "close", "trades"):
                bad = int((ours[c].to_numpy() != theirs[c].to_numpy()).sum())
                if bad:
                    problems.append(f"{c}: {bad} differ")
            for c in ("volume", "vwap"):
                if not np.allclose(ours[c].to_numpy(), theirs[c].to_numpy(), rtol=1e-9, atol=0):
                    problems.append(f"{c} differs")
        verdicts[tf] = "OK" if not problems else "MISMATCH (" + "; ".join(problems) + ")"
        verdicts[tf] += f" [{len(ours):,} bars]"
    return verdicts


# --------------------------------------------------------------------------- end to end

VARIANTS = {  # what `tapeflow replay` computes: flags -> FlowConfig
    "bars + analytics + quality": {},
    "bars + analytics (--no-quality)": {"quality": False},
    "bars only (--no-analytics --no-quality)": {"quality": False, "analytics": False},
}


def end_to_end(path: Path, store: Path, variant: str) -> dict:
    """``tapeflow replay FILE --store STORE --fresh [flags]``, in-process (the CLI's writer
    process included); return figures as a dict."""
    from flows.pipeline import Flow, FlowConfig
    from flows.runner import replay_files
    from flows.store import writer_dir

    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(writer_dir(store), ignore_errors=True)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    flow = Flow(FlowConfig(store=str(store), writer="process", **VARIANTS[variant]))
    summary = replay_files(flow, [str(path)])
    t1 = time.perf_counter()
    flow.close()
    t2 = time.perf_counter()
    c = flow.counters
    return {"rows": summary.rows, "seconds": t2 - t0, "replay_s": t1 - t0, "close_s": t2 - t1,
            "bar_s": flow.stats.bar_seconds, "reconciles": c.reconciles(),
            "accepted": c.accepted, "rss_start_mb": rss0, "peak_rss_mb": peak_rss_mb(),
            "store_mb": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20}


def end_to_end_child(path: Path, store: Path, variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--e2e-child", str(path), "--store", str(store),
                          "--variant", variant], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report

def rate_range(n: int, seconds: list[float]) -> str:
    rates = sorted(n / s / 1e6 for s in seconds)
    if len(rates) == 1 or rates[-1] - rates[0] < 0.005 * rates[-1]:
        return f"{rates[-1]:8.2f}"
    return f"{rates[0]:.2f}-{rates[-1]:.2f}".rjust(8)


def secs_range(seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"{s[0]:.2f}" if len(s) == 1 else f"{s[0]:.2f}-{s[-1]:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trades", type=int, default=10_000_000)
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument("--repeat", type=int, default=2, help="timed runs of each stage (default 2)")
    p.add_argument("--store", default=str(OUT / "bench.zarr"))
    p.add_argument("--no-baselines", action="store_true", help="skip pandas and polars")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end replay")
    p.add_argument("--e2e-child", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=next(iter(VARIANTS)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.e2e_child:
        print(json.dumps(end_to_end(Path(args.e2e_child), Path(args.store), args.variant)))
        return 0

    n = args.trades
    path = make_tape(n, args.symbols)
    print(f"tape: {path.relative_to(ROOT)}  ({n:,} trades, {args.symbols} symbols, "
          f"{SESSION_S / 3600:.1f} h; timeframes {', '.join(TIMEFRAMES)}; {args.repeat} runs each)",
          flush=True)
    rows: list[tuple[str, str, str, str]] = []  # stage, seconds, M trades/s, note

    parse_s = []
    for _ in range(args.repeat):
        table, batches, s = read_batches(path)
        parse_s.append(s)
    rows.append(("parse Parquet (Replayer)", secs_range(parse_s), rate_range(n, parse_s),
                 f"{len(batches)} batches of <= 100k"))
    val_s = []
    for _ in range(args.repeat):
        accepted, s = validate(batches)
        val_s.append(s)
    rows.append(("validate (checks + dedupe)", secs_range(val_s), rate_range(n, val_s), ""))
    del batches
    warm_up(table, accepted[0])
    bar_s = []
    for _ in range(args.repeat):
        gc.collect()
        engine, s = bar_stage(table, accepted)
        bar_s.append(s)
    rows.append(("bar stage: BarEngine.update", secs_range(bar_s), rate_range(n, bar_s),
                 "all 6 timeframes; target >= 20"))
    print(f"  ours done: parse {min(parse_s):.2f} s, validate {min(val_s):.2f} s, "
          f"bars {min(bar_s):.2f} s", flush=True)

    checks: dict[str, str] = {}
    if not args.no_baselines:
        df, sort_s = trades_frame(table, accepted)
        rows.append(("baselines' pre-sort (not in theirs)", f"{sort_s:.2f}", rate_range(n, [sort_s]),
                     "lexsort by (time, trade_id)"))
        ref, s = timed(pandas_floor, df, repeat=args.repeat)
        rows.append(("pandas floor + groupby.agg", secs_range(s), rate_range(n, s), "same 6 timeframes"))
        checks = cross_check(engine, ref)
        del ref
        print(f"  pandas floor done: {min(s):.2f} s", flush=True)
        _, s = timed(pandas_resample, df, repeat=args.repeat)
        rows.append(("pandas groupby(symbol).resample", secs_range(s), rate_range(n, s), "same 6 timeframes"))
        print(f"  pandas resample done: {min(s):.2f} s", flush=True)
        try:
            import polars as pl

            _, s = timed(polars_group_by, polars_frame(df), repeat=args.repeat)
            rows.append((f"polars {pl.__version__} group_by", secs_range(s), rate_range(n, s),
                         f"same 6 timeframes; {pl.thread_pool_size()} threads"))
        except ImportError:
            rows.append(("polars group_by", "-", "-", "polars not installed"))
        del df
    del engine, accepted
    gc.collect()

    e2e = []
    if not args.no_e2e:
        for variant in VARIANTS:
            runs = []
            for _ in range(args.repeat):
                runs.append(end_to_end_child(path, Path(args.store), variant))
                print(f"  end to end, {variant}: {runs[-1]['seconds']:.2f} s", flush=True)
            s = [r["seconds"] for r in runs]
            rows.append((f"end to end: {variant}", secs_range(s), rate_range(n, s),
                         "replay -> store; target >= 5"))
            rows.append(("  of which final flush (close)", secs_range([r["close_s"] for r in runs]), "",
                         f"store {runs[-1]['store_mb']:.0f} MiB"))
            e2e += runs

    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'stage':<{w}}  {'seconds':>11}  {'M trades/s':>10}  note")
    print("-" * (w + 40))
    for stage, secs, rate, note in rows:
        print(f"{stage:<{w}}  {secs:>11}  {rate:>10}  {note}")
    print()
    for tf, verdict in checks.items():
        print(f"cross-check {tf} bars vs pandas: {verdict}")
    if e2e:
        print(f"end to end reconciles: {all(r['reconciles'] for r in e2e)}; "
              f"peak RSS (replay process): {secs_range([r['peak_rss_mb'] for r in e2e])} MiB "
              f"(at start {e2e[-1]['rss_start_mb']:.0f} MiB)")
    print(f"peak RSS (this process, batches + baselines): {peak_rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
