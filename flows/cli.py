"""The ``tapeflow`` command: serve, run, replay and record.

Every command takes ``--store`` and ``--timeframes`` and exits non-zero with a one-line reason
on bad input.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from flows.feeds import FeedError
from flows.schema import TIMEFRAMES, parse_timeframes

EPILOG = """examples:
  tapeflow serve                              simulated market -> data/market.zarr + http://127.0.0.1:5006
  tapeflow run --duration 60 --symbols 500    the flow headless for a minute
  tapeflow run --feed binance --symbols btcusdt,ethusdt     live Binance trades into the store
  tapeflow serve --config feeds.yaml          several venues at once (see examples/feeds.yaml)
  tapeflow record --feed coinbase --symbols BTC-USD -o cb.jsonl --duration 600   raw frames to a file
  tapeflow replay trades.parquet --speed max  a recording into the store, with a reconciliation
"""

#: Trade sources of ``run``/``serve`` (``--feed``).
FEEDS = ("simulated", "binance", "coinbase", "polygon", "psx")
#: Venues ``record`` can record.
RECORD_FEEDS = ("binance", "coinbase", "polygon")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (with a pointer to --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def _speed(text: str) -> float | None:
    return None if text == "max" else _positive(text, "speed must be 'max' or a positive number")


def _positive(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    return value


def _timeframes(text: str) -> tuple[str, ...]:
    try:
        return parse_timeframes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _symbols(text: str) -> int | list[str]:
    if text.strip().isdigit():
        return _positive_int(text)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a number or a comma-separated list of symbols")
    return names


def _positive_float(text: str) -> float:
    return _positive(text, "expected a positive number")


def _venue_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="venue endpoint (default: the venue's public one)")
    parser.add_argument("--kind", choices=["spot", "usdm"], default="spot",
                        help="binance: spot or USDT-M futures endpoints (default: %(default)s)")
    parser.add_argument("--minute-bars", action="store_true",
                        help="polygon: also subscribe to the AM minute aggregates")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tapeflow", description="Market data flows: trades -> OHLCV bars in Zarr -> live dashboards.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--store", default="data/market.zarr", metavar="PATH",
                        help="Zarr store to write (default: %(default)s)")
    common.add_argument("--timeframes", type=_timeframes, default=tuple(TIMEFRAMES), metavar="LIST",
                        help=f"comma-separated bar timeframes (default: {','.join(TIMEFRAMES)})")
    common.add_argument("--window", type=_positive_int, default=120, metavar="MIN",
                        help="minutes late trades may still amend their bar; older ones are "
                             "quarantined as too_late (default: %(default)s)")
    common.add_argument("--history", type=_positive_int, default=500, metavar="BARS",
                        help="bars per timeframe kept in memory (default: %(default)s)")
    common.add_argument("--fresh", action="store_true", help="delete the store first and start empty")
    common.add_argument("--alerts", default=None, metavar="YAML",
                        help="alert rules file (default: alerts.yaml in the store's .writer folder); "
                             "fired alerts are appended to alerts.jsonl beside it")
    common.add_argument("--no-analytics", action="store_true",
                        help="bars only: no indicators, breadth, sectors, quality or alerts")
    common.add_argument("--no-quality", action="store_true",
                        help="skip data-quality scoring (about 1 µs a trade; for the fastest replays)")
    common.add_argument("--symbols-file", default=None, metavar="CSV",
                        help="symbol metadata: a CSV with Symbol (or ticker), Name, Sector and "
                             "optional Exchange columns (sectors feed the sector figures)")

    market = _Parser(add_help=False)
    market.add_argument("--feed", default=None, choices=FEEDS,
                        help="trade source (default: simulated)")
    market.add_argument("--config", default=None, metavar="FEEDS.yaml",
                        help="run the feeds listed in this YAML file instead of one --feed "
                             "(format: see examples/feeds.yaml)")
    market.add_argument("--symbols", type=_symbols, default=100, metavar="N|LIST",
                        help="simulated market: number of symbols (default: %(default)s); "
                             "a venue: comma-separated symbols, e.g. btcusdt,ethusdt (binance), "
                             "BTC-USD (coinbase), AAPL or '*' (polygon)")
    _venue_options(market)
    market.add_argument("--interval", type=_positive_float, default=5.0, metavar="S",
                        help="psx: seconds between polls of the board (default: %(default)s)")
    market.add_argument("--rate", type=_positive_float, default=2000.0, metavar="TPS",
                        help="simulated market: mean trades per second (default: %(default)s)")
    market.add_argument("--seed", type=int, default=0, help="simulated market: seed (default: %(default)s)")

    p = sub.add_parser("serve", parents=[common, market], help="run the flow and serve the dashboard",
                       description="Run the simulated market (or --feed) through the flow into the "
                                   "store and serve the dashboard.")
    p.add_argument("--port", type=int, default=5006, help="HTTP port (default: %(default)s)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 to serve the team's network (default: %(default)s)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument("--backfill", type=float, default=60.0, metavar="MIN",
                   help="simulated market, empty store: minutes of history generated at full "
                        "speed before going live (default: %(default)s; 0 for none)")

    p = sub.add_parser("run", parents=[common, market], help="run the flow headless",
                       description="Run the flow headless, printing a status line, until --duration or Ctrl-C.")
    p.add_argument("--duration", type=_positive_float, default=None, metavar="S",
                   help="stop after S seconds (default: run until interrupted)")
    p.add_argument("--fast", action="store_true",
                   help="simulated market: run as fast as possible instead of in real time")

    p = sub.add_parser("replay", parents=[common], help="replay recorded trades into the store",
                       description="Replay recorded trades through the same flow into the store and "
                                   "print the reconciliation. A replay stopped part-way resumes "
                                   "where it stopped when run again on the same store.")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="CSV, Parquet, or a JSONL websocket capture (tapeflow record, Binance, "
                        "Coinbase or Polygon)")
    p.add_argument("--format", choices=["csv", "parquet", "binance", "coinbase", "polygon", "record"],
                   default=None,
                   help="file format (default: from the extension; for .jsonl from the record "
                        "header or the frames)")
    p.add_argument("--time-unit", choices=["s", "ms", "us", "ns"], default=None,
                   help="unit of numeric epoch times (default: inferred from their magnitude)")
    p.add_argument("--speed", type=_speed, default=None, metavar="max|X",
                   help="'max' (default) or a factor of real time, e.g. 10")
    p.add_argument("--bars", choices=list(TIMEFRAMES), default=None, metavar="TF",
                   help="the files hold ready-made OHLCV bars of this timeframe (columns time|date, "
                        "symbol|name|ticker, open, high, low, close, volume; optional trades, vwap); "
                        "they are rolled up to the higher timeframes")

    p = sub.add_parser("record", help="record a venue's raw websocket frames",
                       description="Connect to a venue and write every frame received, exactly as "
                                   "received, to a JSONL file ({\"recv_ts\": ..., \"frame\": ...} "
                                   "a line, after a header line naming the venue), until --duration, "
                                   "--frames or Ctrl-C. Play it back with tapeflow replay FILE.")
    p.add_argument("--feed", required=True, choices=RECORD_FEEDS, help="venue to record")
    p.add_argument("--symbols", type=_symbols, required=True, metavar="LIST",
                   help="comma-separated symbols: btcusdt,ethusdt (binance), BTC-USD (coinbase), "
                        "AAPL or '*' (polygon, key from POLYGON_API_KEY)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.jsonl", help="file to write")
    _venue_options(p)
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--duration", type=_positive_float, default=None, metavar="S",
                   help="stop after S seconds (default: until interrupted)")
    p.add_argument("--frames", type=_positive_int, default=None, metavar="N",
                   help="stop after N frames")
    return parser


def _make_flow(args: argparse.Namespace, feed: str):
    from flows.pipeline import Flow, FlowConfig
    from flows.store import writer_dir

    if args.history <= args.window:
        raise UserError(f"--history ({args.history}) must be larger than --window ({args.window})")
    store = Path(args.store)
    if args.fresh and store.exists():
        if not (store / "zarr.json").exists():
            raise UserError(f"--fresh: {store} does not look like a tapeflow store; not deleting it")
        shutil.rmtree(store)
        shutil.rmtree(writer_dir(store), ignore_errors=True)
    meta = {}
    if args.symbols_file:
        from flows.breadth import read_symbols_file

        if not Path(args.symbols_file).is_file():
            raise UserError(f"--symbols-file: {args.symbols_file}: no such file")
        try:
            meta = read_symbols_file(args.symbols_file)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"--symbols-file: {args.symbols_file}: {exc}") from None
    flow = Flow(FlowConfig(store=str(store), timeframes=args.timeframes, window=args.window,
                           history=args.history, feed=feed, writer="process",
                           quality=not args.no_quality, alerts=args.alerts,
                           analytics=not args.no_analytics))
    flow.table.meta.update(meta)
    return flow


def _install_sigterm() -> None:
    def handler(signum, frame):  # turn SIGTERM into a clean shutdown (final flush)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_replay(args: argparse.Namespace) -> int:
    from flows.feeds.replay import Replayer
    from flows.runner import Progress, check_readable, format_summary, replay_files
    from flows.schema import SymbolTable

    for name in args.files:  # before touching the store
        check_readable(name)
    Replayer(args.files, SymbolTable(), format=args.format, time_unit=args.time_unit,
             bars=args.bars is not None)  # formats and columns, also before the store
    flow = _make_flow(args, "replay")
    try:
        summary = replay_files(flow, args.files, fmt=args.format, time_unit=args.time_unit,
                               speed=args.speed, progress=Progress(), bars=args.bars)
    finally:
        flow.close()
    format_summary(flow, summary)
    return 0


def _feed_specs(args: argparse.Namespace) -> list | None:
    """The venue feeds of ``run``/``serve`` (None: the simulated market), checked before
    anything is created."""
    from flows.feeds.config import FeedSpec, load_feeds

    if args.config is not None:
        if args.feed is not None:
            raise UserError("--config and --feed are mutually exclusive: the config lists the feeds")
        if not isinstance(args.symbols, int) or args.url is not None:
            raise UserError("--config: set each feed's symbols and url in the config file")
        return load_feeds(args.config)
    feed = args.feed or "simulated"
    args.feed = feed
    if feed == "simulated":
        if not isinstance(args.symbols, int):
            raise UserError("--symbols: the simulated market takes a number of symbols")
        return None
    if feed == "psx":
        if not isinstance(args.symbols, int):
            raise UserError("--symbols: the psx board lists every symbol; drop --symbols")
        if args.url is not None and not args.url.startswith(("http://", "https://")):
            raise UserError(f"--url: the psx board is polled over http(s), got {args.url!r}")
        return [FeedSpec("psx", url=args.url, interval_s=args.interval)]
    if isinstance(args.symbols, int):
        example = {"binance": "btcusdt,ethusdt", "coinbase": "BTC-USD,ETH-USD",
                   "polygon": "AAPL,MSFT"}[feed]
        raise UserError(f"--symbols: give {feed} symbols, e.g. --symbols {example}")
    spec = FeedSpec(feed, tuple(args.symbols), url=args.url, kind=args.kind, bars=args.minute_bars)
    _check_symbols(spec)
    return [spec]


def _check_symbols(spec) -> None:
    """Raise the venue's own one-line error for bad symbols or a missing key."""
    if spec.venue == "binance":
        from flows.feeds.binance import stream_names
        stream_names(spec.symbols)
    elif spec.venue == "coinbase":
        from flows.feeds.coinbase import product_ids
        product_ids(list(spec.symbols))
    elif spec.venue == "polygon":
        from flows.feeds.polygon import KEY_ENV, channel_names
        channel_names(list(spec.symbols), bars=spec.bars)
        if not os.environ.get(spec.key_env, "").strip():
            raise UserError(f"polygon: no API key; set {KEY_ENV}")


class _Feed:
    """The running feeds of ``run``/``serve``: the simulated market, or venue feeds."""

    def __init__(self, flow, args: argparse.Namespace, specs: list | None, backfill_s: float = 0.0):
        self.stop_event = threading.Event()
        self.venues: list = []  # (name, feed)
        if specs is None:
            from flows.runner import start_simulated

            self.thread = start_simulated(
                flow, n_symbols=args.symbols, rate=args.rate, seed=args.seed,
                realtime=not getattr(args, "fast", False), duration_s=getattr(args, "duration", None),
                backfill_s=backfill_s, stop=self.stop_event)
        else:
            from flows.feeds.config import start_feeds

            self.venues = list(zip([s.name for s in specs], start_feeds(flow, specs)))

    def alive(self) -> bool:
        """The simulated market runs, or at least one venue feed has not failed."""
        if self.venues:
            return not self.stop_event.is_set() and any(f.failure is None for _, f in self.venues)
        return self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()
        for _, feed in self.venues:
            feed.stop()
        if not self.venues:
            self.thread.join()

    def failures(self) -> list[str]:
        """``name: reason`` of every venue feed that failed."""
        return [f"{name}: {feed.failure}" for name, feed in self.venues if feed.failure]


def _flow_name(args: argparse.Namespace, specs: list | None) -> str:
    return args.feed if specs is None or args.config is None else "+".join(s.name for s in specs)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.runner import format_summary

    specs = _feed_specs(args)
    flow = _make_flow(args, _flow_name(args, specs))
    try:
        feed = _Feed(flow, args, specs)
    except BaseException:
        flow.close()
        raise
    t0 = time.monotonic()
    try:
        while feed.alive():
            left = None if args.duration is None else args.duration - (time.monotonic() - t0)
            if specs is not None and left is not None and left <= 0:
                break
            time.sleep(1.0 if left is None or specs is None else min(1.0, left))
            c = flow.counters
            print(f"\r{time.monotonic() - t0:7.1f} s  {flow.feed_state:<9} received {c.received:,}  "
                  f"accepted {c.accepted:,}  quarantined {c.quarantined_total:,}",
                  end="", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        print(file=sys.stderr)
        feed.stop()
        flow.close()
    format_summary(flow)
    failures = feed.failures()
    if failures:
        raise FeedError("; ".join(failures))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from flows.feeds.record import start_recording
    from flows.runner import Progress

    if isinstance(args.symbols, int):
        raise UserError(f"--symbols: give {args.feed} symbols to record")
    if args.feed == "polygon":
        from flows.feeds.config import FeedSpec
        _check_symbols(FeedSpec("polygon", tuple(args.symbols), bars=args.minute_bars))
    recording = start_recording(args.feed, args.symbols, args.output, url=args.url,
                                kind=args.kind, bars=args.minute_bars, overwrite=args.force)
    progress = Progress()
    t0 = time.monotonic()
    try:
        while recording.failure is None:
            elapsed = time.monotonic() - t0
            if args.duration is not None and elapsed >= args.duration:
                break
            if args.frames is not None and recording.writer.frames >= args.frames:
                break
            w = recording.writer
            progress.update(f"{elapsed:7.1f} s  {recording.feed.tracker.state:<10} {w.frames:,} frames  "
                            f"{w.bytes:,} bytes  {recording.trades:,} trades")
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        recording.stop()
        progress.done()
    print(recording.summary(), flush=True)
    if recording.failure:
        raise FeedError(f"{args.feed}: {recording.failure}")
    return 0


def _warm_up() -> None:
    """Compile the kernels before the first page needs them, saying so if it takes a while
    (about 30 s once per checkout; then ~1 s to load them from numba's cache)."""
    from flows.warmup import warm_up

    done = threading.Event()

    def notice() -> None:
        if not done.wait(2.0):
            print("compiling the flow's kernels (once per checkout, about 30 s)...", flush=True)

    threading.Thread(target=notice, daemon=True).start()
    try:
        seconds = warm_up()
    finally:
        done.set()
    if seconds > 2.0:
        print(f"kernels compiled in {seconds:.0f} s (cached for the next start)", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from dashboards.app import serve

    specs = _feed_specs(args)
    flow = _make_flow(args, _flow_name(args, specs))
    backfill = args.backfill * 60 if flow.engine.open_minute is None else 0.0  # only into an empty store
    try:
        _warm_up()
        feed = _Feed(flow, args, specs, backfill_s=backfill)
    except BaseException:
        flow.close()
        raise
    url = f"http://{args.address}:{args.port}"
    try:
        server = serve(flow, port=args.port, address=args.address, show=args.show, threaded=False, start=False)
    except OSError as exc:
        feed.stop()
        flow.close()
        raise UserError(f"cannot listen on {url}: {exc.strerror or exc}") from None
    print(f"serving on {url} (store {args.store}); Ctrl-C to stop", flush=True)
    try:
        server.start()
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        feed.stop()
        flow.close()
        print("stopped; store flushed", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from flows.store import StoreError
    from flows.writer import WriterError

    _install_sigterm()
    handlers = {"serve": cmd_serve, "run": cmd_run, "replay": cmd_replay, "record": cmd_record}
    try:
        return handlers[args.command](args)
    except (UserError, FeedError, StoreError, WriterError) as exc:
        print(f"tapeflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tapeflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
