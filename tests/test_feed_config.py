"""Feeds YAML: parsing, one-line errors, and several live feeds into one store via `tapeflow run`."""
from __future__ import annotations

import functools
import json
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import xarray as xr

from flows.cli import main
from flows.feeds import FeedError
from flows.feeds.config import FeedSpec, load_feeds, start_feeds
from flows.feeds.connection import ConnectionConfig
from flows.pipeline import Flow, FlowConfig
from tests.wsserver import Session, WsServer, capture_frames

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
SPOT = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"
# Recorded the same afternoon as the Coinbase capture: one flow has one event-time frontier,
# so feeds months apart would make the later-arriving one's trades too_late.
USDM = DATA / "binance_usdm_ws_combined_2021-04-17T1637Z.jsonl"
COINBASE = DATA / "coinbase_pro_ws_matches_ticker_2021-04-17.jsonl"
FAST = ConnectionConfig(idle_s=5.0, backoff_base_s=0.01, backoff_cap_s=0.05, healthy_after_s=0.2)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("keep_sigterm")]


def write(tmp_path: Path, text: str, name: str = "feeds.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_example_config_parses(monkeypatch):
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    specs = load_feeds(ROOT / "examples" / "feeds.yaml")
    assert specs == [
        FeedSpec("binance", ("btcusdt", "ethusdt"), kind="spot"),
        FeedSpec("coinbase", ("BTC-USD", "ETH-USD")),
        FeedSpec("polygon", ("*",), key_env="POLYGON_API_KEY", bars=True),
        FeedSpec("psx", url="https://dps.psx.com.pk/market-watch", interval_s=5.0),
    ]
    assert [s.name for s in specs] == ["binance-spot", "coinbase", "polygon", "psx"]


def test_sectors_path_is_relative_to_the_config(tmp_path):
    (tmp_path / "codes.csv").write_text((DATA / "psx_sector_codes_2021.csv").read_text())
    path = write(tmp_path, "feeds:\n  - venue: psx\n    sectors: codes.csv\n    interval_s: 0.5\n")
    assert load_feeds(path) == [FeedSpec("psx", interval_s=0.5, sectors=str(tmp_path / "codes.csv"))]


BAD = [
    ("feeds:\n  - venue: binance\n   symbols: [x", "not valid YAML (line 3, column"),
    ("- venue: binance\n", "expected a top-level 'feeds:' list"),
    ("feeds: []\n", "'feeds' must be a non-empty list"),
    ("feeds: [{venue: binance, symbols: [btcusdt]}]\nfeed: 1\n", "unknown top-level key 'feed'"),
    ("feeds:\n  - symbols: [btcusdt]\n", "feeds[0]: missing key 'venue' (one of binance, coinbase"),
    ("feeds:\n  - venue: kraken\n", "feeds[0]: unknown venue 'kraken' (choose binance, coinbase, polygon, psx)"),
    ("feeds:\n  - venue: binance\n", "feeds[0] (binance): missing key 'symbols'"),
    ("feeds:\n  - venue: coinbase\n    symbol: [BTC-USD]\n",
     "feeds[0] (coinbase): unknown key 'symbol' (allowed: symbols, url)"),
    ("feeds:\n  - venue: binance\n    symbols: 5\n", "feeds[0] (binance): symbols must be a list"),
    ("feeds:\n  - venue: binance\n    symbols: []\n", "feeds[0] (binance): symbols is empty"),
    ("feeds:\n  - venue: binance\n    symbols: [btc/usdt]\n", "feeds[0] (binance): bad symbol 'btc/usdt'"),
    ("feeds:\n  - venue: coinbase\n    symbols: [BTCUSD]\n", "feeds[0] (coinbase): bad product id 'BTCUSD'"),
    ("feeds:\n  - venue: binance\n    kind: coin\n    symbols: [btcusdt]\n",
     "feeds[0] (binance): kind must be spot or usdm, got 'coin'"),
    ("feeds:\n  - venue: psx\n    interval_s: fast\n",
     "feeds[0] (psx): interval_s must be a positive number of seconds, got 'fast'"),
    ("feeds:\n  - venue: psx\n    interval_s: 0\n", "interval_s must be a positive number of seconds, got 0"),
    ("feeds:\n  - venue: psx\n    interval_s: true\n", "interval_s must be a positive number of seconds, got True"),
    ("feeds:\n  - venue: psx\n    url: ftp://x\n", "feeds[0] (psx): url must start with http:// or https://"),
    ("feeds:\n  - venue: coinbase\n    symbols: [BTC-USD]\n    url: http://x\n",
     "url must start with ws:// or wss://, got 'http://x'"),
    ("feeds:\n  - venue: polygon\n    symbols: [AAPL]\n    key_env: NO_SUCH_KEY_VAR\n",
     "feeds[0] (polygon): environment variable NO_SUCH_KEY_VAR (key_env) is not set"),
    ("feeds:\n  - venue: polygon\n    symbols: [AAPL]\n    key_env: K\n    bars: yes please\n",
     "feeds[0] (polygon): bars must be true or false, got 'yes please'"),
    ("feeds:\n  - venue: psx\n    sectors: nowhere.csv\n", "feeds[0] (psx): sectors:"),
    ("feeds:\n  - venue: binance\n    symbols: [btcusdt]\n  - venue: binance\n    symbols: [ethusdt]\n",
     "feeds[1] (binance): a second binance-spot feed (feeds[0]); list all its symbols in one entry"),
    ("feeds:\n  - btcusdt\n", "feeds[0]: expected a mapping with a 'venue' key"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:30] for _, m in BAD])
def test_config_mistakes_are_one_line_errors_naming_file_and_key(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("K", "key")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    path = write(tmp_path, text)
    with pytest.raises(FeedError) as err:
        load_feeds(path)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_missing_config_file_and_cli_mistakes_are_one_line(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    cases = [
        (["run", "--config", str(tmp_path / "none.yaml"), "--store", str(store)], "none.yaml: no such file"),
        (["run", "--config", str(write(tmp_path, "feeds:\n  - venue: kraken\n")), "--store", str(store)],
         "unknown venue 'kraken'"),
        (["run", "--config", "x.yaml", "--feed", "binance", "--store", str(store)],
         "--config and --feed are mutually exclusive"),
        (["serve", "--config", "x.yaml", "--symbols", "btcusdt", "--store", str(store)],
         "set each feed's symbols and url in the config file"),
        (["run", "--feed", "psx", "--symbols", "OGDC", "--store", str(store)],
         "the psx board lists every symbol"),
        (["run", "--feed", "coinbase", "--symbols", "btcusd", "--store", str(store)],
         "coinbase: bad product id 'btcusd'"),
        (["run", "--feed", "psx", "--url", "ws://x", "--store", str(store)],
         "the psx board is polled over http(s)"),
        (["run", "--feed", "kraken"], "invalid choice: 'kraken'"),
        (["run", "--feed", "psx", "--interval", "0"], "expected a positive number, got '0'"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code in (1, 2) and len(lines) == 1 and message in lines[0], (argv, lines)
    assert not store.exists()  # refused before anything was created


def usdm_frames() -> list[str]:
    """The capture's aggTrade and kline frames (its depth and bookTicker frames, nine in ten,
    only slow the test down)."""
    return [f for f in capture_frames(USDM) if "@aggTrade" in f or "@kline" in f]


def expected_trades() -> tuple[int, int, int]:
    """From the captures: Binance aggTrades and the exchange trades they stand for
    (``l - f + 1``), and Coinbase matches (all distinct)."""
    agg = [json.loads(f)["data"] for f in capture_frames(USDM) if "@aggTrade" in f]
    matches = [f for f in map(json.loads, capture_frames(COINBASE))
               if f["type"] in ("match", "last_match")]
    return len(agg), sum(d["l"] - d["f"] + 1 for d in agg), len(matches)


def two_feed_config(tmp_path: Path, binance_url: str, coinbase_url: str) -> Path:
    products = sorted({json.loads(f).get("product_id") for f in capture_frames(COINBASE)} - {None})
    return write(tmp_path, f"""feeds:
  - venue: binance
    kind: usdm
    symbols: [dentusdt, ksmusdt, xmrusdt, yfiusdt]
    url: {binance_url}
  - venue: coinbase
    symbols: [{", ".join(products)}]
    url: {coinbase_url}
""")


def stored_trades(store: Path) -> dict[str, int]:
    ds = xr.open_zarr(store, group="bars/1m").load()
    return {s: int(ds["trades"].sel(symbol=s).sum()) for s in ds.symbol.values.tolist()}


def test_run_config_with_two_feeds_stores_both_feeds_trades(tmp_path, capsys):
    agg, binance_trades, coinbase_trades = expected_trades()
    with WsServer(usdm_frames()) as binance, WsServer(capture_frames(COINBASE)) as coinbase:
        config = two_feed_config(tmp_path, binance.url, coinbase.url)
        code = main(["run", "--config", str(config), "--duration", "3", "--no-analytics",
                     "--store", str(tmp_path / "m.zarr")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"received     {agg + coinbase_trades:>14,}" in out.out and "reconciles   yes" in out.out
    assert f"quarantined  {0:>14,}" in out.out
    assert "LIVE" in out.err  # the status line: both feeds live
    trades = stored_trades(tmp_path / "m.zarr")
    assert sum(n for s, n in trades.items() if "-" not in s) == binance_trades
    assert sum(n for s, n in trades.items() if "-" in s) == coinbase_trades


def test_a_failed_feed_is_reported_at_the_end_while_the_other_keeps_going(tmp_path, capsys):
    agg, binance_trades, _ = expected_trades()
    refuse = Session(refuse_status=403)
    with WsServer(usdm_frames()) as binance, WsServer(["{}"], [refuse]) as coinbase:
        config = two_feed_config(tmp_path, binance.url, coinbase.url)
        t0 = time.monotonic()
        code = main(["run", "--config", str(config), "--duration", "2", "--no-analytics",
                     "--store", str(tmp_path / "m.zarr")])
        elapsed = time.monotonic() - t0
    out = capsys.readouterr()
    assert code == 1 and elapsed >= 2.0
    errors = [line for line in out.err.splitlines() if "error" in line]
    assert errors == ["tapeflow run: error: coinbase: handshake refused: HTTP 403 Forbidden; not retrying"]
    assert f"received     {agg:>14,}" in out.out
    assert sum(stored_trades(tmp_path / "m.zarr").values()) == binance_trades


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_start_feeds_summarises_states_and_starts_every_venue(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(_QuietHandler, directory=str(DATA)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    board = f"http://127.0.0.1:{httpd.server_address[1]}/psx_board_sample.html"
    flow = Flow(FlowConfig(store=None, timeframes=("1m",), analytics=False))
    specs = [FeedSpec("binance", ("ftmusdt",)), FeedSpec("coinbase", ("BAND-GBP",)),
             FeedSpec("psx", url=board, interval_s=0.05)]
    try:
        with WsServer(capture_frames(SPOT)) as b, WsServer(capture_frames(COINBASE)) as c:
            specs[0] = FeedSpec("binance", ("ftmusdt",), url=b.url)
            specs[1] = FeedSpec("coinbase", ("BAND-GBP",), url=c.url)
            feeds = start_feeds(flow, specs, config=FAST)
            try:
                wait_until(lambda: flow.feed_state == "LIVE")
                assert sorted(flow.feeds) == ["binance-spot", "coinbase", "psx"]
                wait_until(lambda: feeds[2].health().frames >= 2)  # the board was polled
                feeds[1].stop()
                wait_until(lambda: flow.feed_state == "binance-spot LIVE · coinbase STOPPED · psx LIVE")
            finally:
                for feed in feeds:
                    feed.stop()
        wait_until(lambda: flow.feed_state == "STOPPED")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_start_feeds_stops_the_started_ones_when_a_later_one_cannot_start(monkeypatch):
    monkeypatch.delenv("POLYGON_API_KEY", raising=False)
    flow = Flow(FlowConfig(store=None, timeframes=("1m",), analytics=False))
    with WsServer(capture_frames(SPOT)) as server:
        specs = [FeedSpec("binance", ("ftmusdt",), url=server.url), FeedSpec("polygon", ("AAPL",))]
        with pytest.raises(FeedError, match="polygon: no API key"):
            start_feeds(flow, specs, config=FAST)
    assert flow.feed_healths()[0]["state"] == "STOPPED"
