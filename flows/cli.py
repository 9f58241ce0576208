"""The ``tapeflow`` command: serve, run and replay.

Every command takes ``--store`` and ``--timeframes`` and exits non-zero with a one-line reason
on bad input.
"""
from __future__ import annotations

import argparse
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
  tapeflow replay trades.parquet --speed max  a recording into the store, with a reconciliation
"""


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
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a number or a comma-separated list of symbols")
    return names


def _positive_float(text: str) -> float:
    return _positive(text, "expected a positive number")


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
    market.add_argument("--feed", default="simulated", choices=["simulated", "binance"],
                        help="trade source (default: %(default)s)")
    market.add_argument("--symbols", type=_symbols, default=100, metavar="N|LIST",
                        help="simulated market: number of symbols (default: %(default)s); "
                             "a venue: comma-separated symbols, e.g. btcusdt,ethusdt")
    market.add_argument("--url", default=None,
                        help="venue websocket URL (default: the venue's public endpoint)")
    market.add_argument("--kind", choices=["spot", "usdm"], default="spot",
                        help="binance: spot or USDT-M futures endpoints (default: %(default)s)")
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
    p.add_argument("files", nargs="+", metavar="FILE", help="CSV, Parquet or Binance JSONL capture")
    p.add_argument("--format", choices=["csv", "parquet", "binance"], default=None,
                   help="file format (default: from the extension)")
    p.add_argument("--time-unit", choices=["s", "ms", "us", "ns"], default=None,
                   help="unit of numeric epoch times (default: inferred from their magnitude)")
    p.add_argument("--speed", type=_speed, default=None, metavar="max|X",
                   help="'max' (default) or a factor of real time, e.g. 10")
    p.add_argument("--bars", choices=list(TIMEFRAMES), default=None, metavar="TF",
                   help="the files hold ready-made OHLCV bars of this timeframe (columns time|date, "
                        "symbol|name|ticker, open, high, low, close, volume; optional trades, vwap); "
                        "they are rolled up to the higher timeframes")
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
    from flows.runner import Progress, check_readable, format_summary, replay_files

    for name in args.files:  # before touching the store
        check_readable(name)
    flow = _make_flow(args, "replay")
    try:
        summary = replay_files(flow, args.files, fmt=args.format, time_unit=args.time_unit,
                               speed=args.speed, progress=Progress(), bars=args.bars)
    finally:
        flow.close()
    format_summary(flow, summary)
    return 0


def _check_feed_args(args: argparse.Namespace) -> None:
    """Refuse a feed/symbols mismatch before anything is created."""
    if args.feed == "simulated" and not isinstance(args.symbols, int):
        raise UserError("--symbols: the simulated market takes a number of symbols")
    if args.feed != "simulated" and isinstance(args.symbols, int):
        raise UserError(f"--symbols: give {args.feed} symbols, e.g. --symbols btcusdt,ethusdt")


class _Feed:
    """The running feed of ``run``/``serve``: the simulated market or a venue."""

    def __init__(self, flow, args: argparse.Namespace, backfill_s: float = 0.0):
        self.venue = None
        self.stop_event = threading.Event()
        if args.feed == "simulated":
            from flows.runner import start_simulated

            self.thread = start_simulated(
                flow, n_symbols=args.symbols, rate=args.rate, seed=args.seed,
                realtime=not getattr(args, "fast", False), duration_s=getattr(args, "duration", None),
                backfill_s=backfill_s, stop=self.stop_event)
        else:
            from flows.feeds.binance import start_binance

            self.venue = start_binance(flow, args.symbols, url=args.url, kind=args.kind)

    def alive(self) -> bool:
        if self.venue is not None:
            return self.venue.failure is None and not self.stop_event.is_set()
        return self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()
        if self.venue is not None:
            self.venue.stop()
        else:
            self.thread.join()

    def failure(self) -> str | None:
        return None if self.venue is None else self.venue.failure


def cmd_run(args: argparse.Namespace) -> int:
    from flows.runner import format_summary

    _check_feed_args(args)
    flow = _make_flow(args, args.feed)
    try:
        feed = _Feed(flow, args)
    except BaseException:
        flow.close()
        raise
    t0 = time.monotonic()
    try:
        while feed.alive():
            time.sleep(1.0)
            if args.duration is not None and args.feed != "simulated" and time.monotonic() - t0 >= args.duration:
                break
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
    if feed.failure():
        raise FeedError(f"{args.feed}: {feed.failure()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dashboards.app import serve

    _check_feed_args(args)
    flow = _make_flow(args, args.feed)
    backfill = args.backfill * 60 if flow.engine.open_minute is None else 0.0  # only into an empty store
    try:
        feed = _Feed(flow, args, backfill_s=backfill)
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
    handlers = {"serve": cmd_serve, "run": cmd_run, "replay": cmd_replay}
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
