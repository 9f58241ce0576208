"""`tapeflow record` against a loopback websocket server, then `tapeflow replay` of the file.

The oracle is a live flow fed by the venue's own feed from the *same* server session: the
recording replayed into a fresh store must give the same bars, every field of every timeframe,
and the same reconciliation counts, malformed frames included.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from flows.cli import main
from flows.feeds.binance import start_binance
from flows.feeds.coinbase import start_coinbase
from flows.feeds.connection import ConnectionConfig
from flows.feeds.polygon import start_polygon
from flows.pipeline import Flow, FlowConfig
from flows.runner import replay_files
from flows.schema import TIMEFRAMES
from tests.oracle import assert_bars_equal, dataset_to_frame
from tests.wsserver import Session, WsServer, capture_frames

DATA = Path(__file__).parent / "data"
SPOT = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"
USDM = DATA / "binance_usdm_ws_combined_2021-04-17T1637Z.jsonl"
COINBASE = DATA / "coinbase_pro_ws_matches_ticker_2021-04-17.jsonl"
FAST = ConnectionConfig(idle_s=5.0, backoff_base_s=0.01, backoff_cap_s=0.05, healthy_after_s=0.2)
GARBAGE = ["{not json", b"\xff\xfe binary garbage"]

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("keep_sigterm")]


def live_flow() -> Flow:
    return Flow(FlowConfig(store=None, timeframes=TIMEFRAMES, analytics=False))


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def record_and_replay(tmp_path: Path, capsys, server: WsServer, frames: int, record_args: list[str],
                      start_live, cli: bool = True) -> tuple[Flow, Path, str | Flow]:
    """Run the live feed and `tapeflow record` on the same server, then replay the file:
    with ``cli`` by `tapeflow replay` into a fresh store (and return its stdout), else by
    :func:`flows.runner.replay_files` into a fresh in-memory flow (returned; faster: no writer
    process). Return the live flow, the recording and the replay."""
    flow = live_flow()
    feed = start_live(flow)
    out = tmp_path / "rec.jsonl"
    try:
        code = main(["record", *record_args, "--url", server.url, "-o", str(out),
                     "--frames", str(frames), "--duration", "20"])
        assert code == 0
        wait_until(lambda: feed.health().frames >= frames)
        assert feed.drain()
    finally:
        feed.stop()
    recorded = capsys.readouterr()
    assert f"recorded {frames:,} frames" in recorded.out and str(out) in recorded.out
    if not cli:
        replayed = live_flow()
        replay_files(replayed, [str(out)])
        return flow, out, replayed
    assert main(["replay", str(out), "--store", str(tmp_path / "rec.zarr"), "--no-analytics"]) == 0
    return flow, out, capsys.readouterr().out


def assert_same_bars(replayed: Path | Flow, flow: Flow) -> None:
    """Every timeframe: the same bar keys, OHLC and trade counts exactly, volume and vwap to
    float64 summation rounding (the live feed's batches end wherever frames happened to queue)."""
    for tf in TIMEFRAMES:
        if isinstance(replayed, Flow):
            got = dataset_to_frame(replayed.engine.dataset(tf))
        else:
            got = dataset_to_frame(xr.open_zarr(replayed, group=f"bars/{tf}").load())
        live = dataset_to_frame(flow.engine.dataset(tf))
        assert len(live) > 0
        assert_bars_equal(got, live)


def assert_counts_printed(out: str, flow: Flow) -> None:
    c = flow.counters
    assert f"received     {c.received:>14,}" in out
    assert f"accepted     {c.accepted:>14,}" in out
    assert f"duplicates   {c.duplicates:>14,}" in out
    for reason, n in c.quarantined.items():
        assert f"  {reason:<22}{n:>8,}" in out
    assert "reconciles   yes" in out


def assert_same_counts(replayed: Flow, flow: Flow) -> None:
    assert replayed.counters.to_dict() == flow.counters.to_dict()
    assert replayed.counters.reconciles()


@pytest.mark.parametrize("path, cli", [(SPOT, True), (USDM, False)], ids=["spot-cli", "usdm"])
def test_binance_recording_replays_to_the_live_bars(tmp_path, capsys, path, cli):
    frames = capture_frames(path)
    symbols = sorted({json.loads(f)["stream"].split("@")[0] for f in frames})
    with WsServer(frames, [Session(inject={100: GARBAGE})]) as server:
        flow, out, replayed = record_and_replay(
            tmp_path, capsys, server, len(frames) + len(GARBAGE),
            ["--feed", "binance", "--symbols", ",".join(symbols)],
            lambda flow: start_binance(flow, symbols, url=server.url, config=FAST), cli)

    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["tapeflow_record"] == 1 and header["venue"] == "binance"
    assert header["kind"] == "spot" and f"{symbols[0]}@aggTrade" in header["streams"]
    assert len(lines) == 1 + len(frames) + len(GARBAGE)
    assert [json.loads(line)["raw"] for line in lines if '"raw":' in line] == \
        ["{not json", "\ufffd\ufffd binary garbage"]
    # The frames are the server's, in order and unchanged.
    assert [json.dumps(json.loads(line)["frame"], separators=(",", ":"))
            for line in lines[1:] if '"frame":' in line] == frames
    assert flow.counters.quarantined == {"malformed": 2}
    if cli:
        assert_counts_printed(replayed, flow)
        assert_same_bars(tmp_path / "rec.zarr", flow)
    else:
        assert_same_counts(replayed, flow)
        assert_same_bars(replayed, flow)


def test_coinbase_recording_replays_to_the_live_bars(tmp_path, capsys):
    frames = capture_frames(COINBASE)
    products = sorted({json.loads(f).get("product_id") for f in frames} - {None})
    with WsServer(frames, [Session(inject={50: GARBAGE[:1]})]) as server:
        flow, out, replayed = record_and_replay(
            tmp_path, capsys, server, len(frames) + 1,
            ["--feed", "coinbase", "--symbols", ",".join(products)],
            lambda flow: start_coinbase(flow, products, url=server.url, config=FAST))

    assert json.loads(out.read_text().splitlines()[0])["streams"] == products
    assert flow.counters.accepted == 107 and flow.counters.quarantined == {"malformed": 1}
    assert_counts_printed(replayed, flow)
    assert "ignored ticker frames: 107" in replayed
    assert_same_bars(tmp_path / "rec.zarr", flow)


def polygon_frames() -> list[str]:
    """Polygon frames in the documented format: trades in two minutes, and minute aggregates
    of one of them (left out: its trades build it) and of a minute with no trade seen."""
    t0 = 1_610_144_640_000  # 2021-01-08 22:24 UTC
    trades = [{"ev": "T", "sym": s, "x": 4, "i": str(i), "z": 3, "p": p, "s": 100, "c": [0],
               "t": t0 + 1000 * i, "q": 1000 + i}
              for i, (s, p) in enumerate([("MSFT", 114.125), ("AAPL", 226.87), ("MSFT", 114.2),
                                          ("AAPL", 226.5), ("MSFT", 114.0)])]
    am = [{"ev": "AM", "sym": sym, "v": 4110, "av": 9470157, "op": 0.4372, "vw": vw, "o": o,
           "c": c, "h": h, "l": lo, "a": 0.4352, "z": 685, "s": s, "e": s + 60_000}
          for sym, s, o, h, lo, c, vw in [("MSFT", t0, 114.1, 999.0, 1.0, 999.0, 114.1),
                                          ("GTE", t0 - 60_000, 0.4488, 0.4489, 0.4486, 0.4486, 0.4488)]]
    dump = lambda x: json.dumps(x, separators=(",", ":"))
    return [dump([{"ev": "status", "status": "connected", "message": "Connected Successfully"}]),
            dump([{"ev": "status", "status": "auth_success", "message": "authenticated"}]),
            dump(trades[:3]), dump(trades[3:]), dump(am)]


def test_polygon_recording_replays_trades_and_minute_bars_as_live(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLYGON_API_KEY", "test-key")
    frames = polygon_frames()
    with WsServer(frames) as server:
        flow, out, replayed = record_and_replay(
            tmp_path, capsys, server, len(frames),
            ["--feed", "polygon", "--symbols", "MSFT,AAPL,GTE", "--minute-bars"],
            lambda flow: start_polygon(flow, ["MSFT", "AAPL", "GTE"], url=server.url, bars=True,
                                       config=FAST), cli=False)
        received = [m for c in server.connections for m in c.received]

    assert "test-key" not in out.read_text()  # the key is sent, never recorded
    assert any("test-key" in m for m in received)
    assert json.loads(out.read_text().splitlines()[0])["bars"] is True
    assert flow.counters.accepted == 5 + 1  # five trades and GTE's bar
    assert_same_counts(replayed, flow)
    assert_same_bars(replayed, flow)
    assert dataset_to_frame(replayed.engine.dataset("1m")).loc[
        lambda df: df.index.get_level_values("symbol") == "MSFT", "close"].tolist() == [114.0]


def test_a_killed_recorder_leaves_a_file_that_replays(tmp_path):
    frames = capture_frames(SPOT)
    out = tmp_path / "killed.jsonl"
    with WsServer(frames, [Session(interval_s=0.002)]) as server:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "record", "--feed", "binance",
                                 "--symbols", "ftmusdt", "--url", server.url, "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") > 300, timeout=20)
        finally:
            proc.kill()
            proc.wait(10)
    data = out.read_bytes()
    lines = data.splitlines()
    assert data.endswith(b"\n")  # whole lines only: each is flushed as it is written
    assert all(json.loads(line) for line in lines)
    from flows.feeds.replay import Replayer
    from flows.schema import SymbolTable

    replayer = Replayer(out, SymbolTable())
    trades = sum(len(b) for b, q in replayer)
    assert trades == sum('@aggTrade"' in line.decode() for line in lines[1:])
    assert replayer.rows_read == trades  # nothing quarantined


def test_record_help_and_user_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main(["record", "--help"])
    assert exit_.value.code == 0
    assert "--frames" in capsys.readouterr().out

    existing = tmp_path / "taken.jsonl"
    existing.write_text("keep me\n")
    monkeypatch.delenv("POLYGON_API_KEY", raising=False)
    cases = [
        (["record", "--symbols", "btcusdt", "-o", "x.jsonl"], "required: --feed"),
        (["record", "--feed", "kraken", "--symbols", "x", "-o", "x.jsonl"], "invalid choice: 'kraken'"),
        (["record", "--feed", "binance", "--symbols", "btc/usdt", "-o", str(tmp_path / "a.jsonl")],
         "bad symbol 'btc/usdt'"),
        (["record", "--feed", "coinbase", "--symbols", "BTCUSD", "-o", str(tmp_path / "b.jsonl")],
         "bad product id 'BTCUSD'"),
        (["record", "--feed", "polygon", "--symbols", "AAPL", "-o", str(tmp_path / "c.jsonl")],
         "no API key"),
        (["record", "--feed", "binance", "--symbols", "btcusdt", "-o", str(existing)],
         "already exists"),
        (["record", "--feed", "binance", "--symbols", "btcusdt", "-o", str(tmp_path / "no" / "d.jsonl")],
         "cannot create"),
        (["record", "--feed", "binance", "--symbols", "btcusdt", "-o", "x.jsonl", "--duration", "0"],
         "expected a positive number"),
        (["record", "--feed", "binance", "--symbols", "btcusdt", "-o", "/dev/full", "--force"],
         "/dev/full: cannot write: No space left on device"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        assert code in (1, 2), argv
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (argv, err)
        assert lines[0].startswith("tapeflow record: error: ")
    assert existing.read_text() == "keep me\n"
    assert not list(tmp_path.glob("[abc].jsonl"))  # nothing created for a mistake


def test_a_refused_connection_fails_with_one_line_and_a_valid_file(tmp_path, capsys):
    out = tmp_path / "refused.jsonl"
    with WsServer(["{}"], [Session(refuse_status=403)]) as server:
        code = main(["record", "--feed", "binance", "--symbols", "btcusdt", "--url", server.url,
                     "-o", str(out), "--duration", "10"])
    captured = capsys.readouterr()
    assert code == 1
    assert "recorded 0 frames" in captured.out
    error = [line for line in captured.err.splitlines() if "error" in line]
    assert error == [error[0]] and "handshake refused: HTTP 403" in error[0]
    assert json.loads(out.read_text())["venue"] == "binance"  # the header alone


def test_a_frame_that_cannot_be_written_fails_the_recording(tmp_path):
    from flows.feeds.record import start_recording

    class Full:
        def write(self, line):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    frames = capture_frames(SPOT)
    with WsServer(frames, [Session(interval_s=0.01)]) as server:
        recording = start_recording("binance", ["ftmusdt"], tmp_path / "r.jsonl", url=server.url)
        try:
            wait_until(lambda: recording.writer.frames >= 5)
            recording.writer._file = Full()
            wait_until(lambda: recording.failure is not None)
        finally:
            recording.stop()
    assert recording.failure.startswith(f"{tmp_path / 'r.jsonl'}: cannot write: No space left on device")
    assert recording.feed.health().state == "FAILED"


def test_replay_routes_captures_by_header_and_frames(tmp_path, capsys):
    from flows.feeds import FeedError
    from flows.feeds.replay import Replayer, read_trades
    from flows.schema import SymbolTable

    # A plain Coinbase capture (no header) is told from its frames.
    trades = [b for b, _ in read_trades(COINBASE, symbols=SymbolTable())]
    assert sum(len(b) for b in trades) == 107
    header = {"tapeflow_record": 1, "venue": "coinbase", "streams": ["BAND-GBP"]}
    rec = tmp_path / "cb.jsonl"
    rec.write_text(json.dumps(header) + "\n" + COINBASE.read_text())
    assert sum(len(b) for b, _ in read_trades(rec, symbols=SymbolTable(), format="record")) == 107
    with pytest.raises(FeedError, match="recorded from coinbase, not binance"):
        Replayer(rec, SymbolTable(), format="binance")
    with pytest.raises(FeedError, match="no tapeflow record header line"):
        Replayer(SPOT, SymbolTable(), format="record")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({**header, "venue": "kraken"}) + "\n")
    with pytest.raises(FeedError, match="unknown venue 'kraken'"):
        Replayer(odd, SymbolTable())
    code = main(["replay", str(rec), "--format", "polygon", "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == (f"tapeflow replay: error: {rec.name}: recorded from coinbase, "
                                 "not polygon; drop --format or pass --format coinbase")
    assert not (tmp_path / "s.zarr").exists()
