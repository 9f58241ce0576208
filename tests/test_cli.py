"""The `tapeflow` command end to end: replay summaries, resume, and bad input as one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from tests.oracle import (
    accepted_trades,
    adversarial_trades,
    assert_bars_equal,
    dataset_to_frame,
    pandas_bars,
)

DATA = Path(__file__).parent / "data"


def tapeflow(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tape_csv(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    df = adversarial_trades(seed=21, n=3000)
    path = tmp_path_factory.mktemp("tape") / "trades.csv"
    out = df.copy()
    out["time"] = pd.to_datetime(out.time, unit="ns").dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out.to_csv(path, index=False)
    return path, df


@pytest.mark.slow
def test_replay_csv_stores_oracle_bars_and_prints_reconciliation(tmp_path, tape_csv):
    path, df = tape_csv
    store = tmp_path / "m.zarr"
    proc = tapeflow("replay", str(path), "--store", str(store), "--window", "30", "--history", "60")
    assert proc.returncode == 0, proc.stderr
    want, counts = accepted_trades(df, 30)
    out = proc.stdout
    assert f"received     {len(df):>14,}" in out
    assert f"duplicates   {counts['duplicates']:>14,}" in out
    assert "reconciles   yes" in out and "too_late" in out and "rows/s" in out
    for tf in ("1m", "1h", "1d"):
        got = dataset_to_frame(xr.open_zarr(store, group=f"bars/{tf}").load())
        assert_bars_equal(got, pandas_bars(want, tf))
        assert f"bars {tf:<4}    {len(got):>14,}" in out


@pytest.mark.slow
def test_replay_again_resumes_and_adds_nothing(tmp_path, tape_csv):
    path, _ = tape_csv
    store = tmp_path / "m.zarr"
    assert tapeflow("replay", str(path), "--store", str(store)).returncode == 0
    before = xr.open_zarr(store, group="bars/1m").load()
    again = tapeflow("replay", str(path), "--store", str(store))
    assert again.returncode == 0, again.stderr
    assert "skipped 3,100 rows already in the store" in again.stdout
    xr.testing.assert_identical(xr.open_zarr(store, group="bars/1m").load(), before)


@pytest.mark.slow
def test_binance_capture_replays_and_counts_ignored_streams(tmp_path):
    src = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"
    proc = tapeflow("replay", str(src), "--store", str(tmp_path / "b.zarr"))
    assert proc.returncode == 0, proc.stderr
    assert "received                 28" in proc.stdout
    assert "ignored depthUpdate frames" in proc.stdout or "ignored depth" in proc.stdout
    ds = xr.open_zarr(tmp_path / "b.zarr", group="bars/1m")
    # BADGERBTC has no aggTrade in this capture, so no bar.
    assert sorted(ds.symbol.values.tolist()) == ["FTMUSDT", "SXPBTC", "XMRBTC"]
    # Trade counts are exchange trades (aggTrade l - f + 1), as Binance's klines count them:
    # 28 aggTrades stand for 29 trades.
    assert int(ds["trades"].sum()) == 29


def test_missing_column_is_one_line(tmp_path):
    bad = tmp_path / "nosize.csv"
    bad.write_text("time,symbol,price\n2024-01-01T00:00:00Z,AAA,1.0\n")
    line = one_line_error(tapeflow("replay", str(bad), "--store", str(tmp_path / "s.zarr")))
    assert "size" in line and "nosize.csv" in line


def test_unreadable_and_missing_files_are_one_line(tmp_path):
    line = one_line_error(tapeflow("replay", str(tmp_path / "nope.parquet"), "--store", str(tmp_path / "s.zarr")))
    assert "no such file" in line
    assert not (tmp_path / "s.zarr").exists()  # nothing created for a mistake
    locked = tmp_path / "locked.csv"
    locked.write_text("time,symbol,price,size\n")
    locked.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert "permission denied" in one_line_error(tapeflow("replay", str(locked)))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert "garbage.parquet" in one_line_error(tapeflow("replay", str(garbage), "--store", str(tmp_path / "g.zarr")))


def test_garbage_rows_are_quarantined_with_reasons(tmp_path):
    f = tmp_path / "mixed.csv"
    f.write_text("time,symbol,price,size,trade_id\n"
                 "2024-01-01T00:00:01Z,AAA,10.0,1,1\n"
                 "yesterday,AAA,10.0,1,2\n"
                 "2024-01-01T00:00:02Z,AAA,abc,1,3\n"
                 "2024-01-01T00:00:03Z,AAA,-5,1,4\n"
                 "2024-01-01T00:00:04Z,AAA,10.5,0,5\n"
                 "2024-01-01T00:00:05Z,AAA,10.5,2,1\n"
                 "2024-01-01T00:00:06Z,AAA,11.0,2,6\n")
    store = tmp_path / "q.zarr"
    proc = tapeflow("replay", str(f), "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    q = xr.open_zarr(store, group="quarantine").load()
    reasons = sorted(q.reason.values.tolist())
    assert reasons == ["bad_time", "non_finite_price", "non_positive_price", "non_positive_size"]
    assert "received                  7" in proc.stdout and "duplicates                1" in proc.stdout
    bars = xr.open_zarr(store, group="bars/1m").load()
    assert int(bars["trades"].sum()) == 2 and float(bars["close"].max()) == 11.0


def test_bad_options_are_one_line(tmp_path):
    assert "speed must be 'max' or a positive number" in one_line_error(tapeflow("replay", "x.csv", "--speed", "fast"))
    assert "unknown timeframe '2m'" in one_line_error(tapeflow("replay", "x.csv", "--timeframes", "2m"))
    assert "the following arguments are required: FILE" in one_line_error(tapeflow("replay"))
    proc = tapeflow("run", "--history", "10", "--window", "20", "--store", str(tmp_path / "h.zarr"))
    assert "must be larger than --window" in one_line_error(proc)


def test_store_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("hello")
    src = tmp_path / "t.csv"
    src.write_text("time,symbol,price,size\n2024-01-01T00:00:01Z,AAA,10.0,1\n")
    assert "not a store directory" in one_line_error(tapeflow("replay", str(src), "--store", str(f)))


def test_help_lists_commands():
    proc = tapeflow("--help")
    assert proc.returncode == 0
    for word in ("serve", "run", "replay", "examples"):
        assert word in proc.stdout
    assert "--speed" in tapeflow("replay", "--help").stdout


@pytest.mark.slow
def test_run_binance_feed_from_a_loopback_server(tmp_path):
    # A real websocket server on loopback replays a real capture; `tapeflow run --feed binance`
    # connects to it and the stored bars equal `tapeflow replay` of the same capture.
    from tests.wsserver import Session, WsServer, capture_frames

    src = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"
    server = WsServer(capture_frames(src), [Session(then="hold")])
    server.start()
    try:
        proc = tapeflow("run", "--feed", "binance", "--symbols", "ftmusdt,sxpbtc,badgerbtc,xmrbtc",
                        "--url", server.url, "--duration", "6", "--store", str(tmp_path / "live.zarr"),
                        "--no-quality")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "received                 28" in proc.stdout and "reconciles   yes" in proc.stdout
    assert tapeflow("replay", str(src), "--store", str(tmp_path / "rec.zarr")).returncode == 0
    live = dataset_to_frame(xr.open_zarr(tmp_path / "live.zarr", group="bars/1m").load())
    recorded = dataset_to_frame(xr.open_zarr(tmp_path / "rec.zarr", group="bars/1m").load())
    assert_bars_equal(live, recorded)


def test_venue_feed_needs_symbols(tmp_path):
    line = one_line_error(tapeflow("run", "--feed", "binance", "--duration", "1",
                                   "--store", str(tmp_path / "s.zarr")))
    assert "give binance symbols" in line
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was created


def test_help_lists_record_and_the_venue_feeds():
    assert "record" in tapeflow("--help").stdout
    run = tapeflow("run", "--help").stdout
    for word in ("--config", "coinbase", "polygon", "psx", "--interval"):
        assert word in run
    record = tapeflow("record", "--help")
    assert record.returncode == 0 and "--output" in record.stdout and "--frames" in record.stdout
    assert "coinbase" in tapeflow("replay", "--help").stdout


def test_record_and_feed_mistakes_are_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POLYGON_API_KEY"}
    assert "required: -o/--output" in one_line_error(tapeflow("record", "--feed", "binance", "--symbols", "btcusdt"))
    assert "no such file" in one_line_error(tapeflow("run", "--config", str(tmp_path / "f.yaml")))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--feed", "polygon", "--symbols", "AAPL",
                           "--store", str(tmp_path / "p.zarr")], capture_output=True, text=True, env=env,
                          check=False)
    assert "polygon: no API key; set POLYGON_API_KEY" in one_line_error(proc)
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.slow
def test_record_then_replay_with_the_installed_command(tmp_path):
    # `tapeflow record` from a loopback server replaying a real capture, then `tapeflow replay`
    # of the file: the same trades as a replay of the capture itself.
    from tests.wsserver import WsServer, capture_frames

    src = DATA / "binance_spot_ws_combined_2021-08-14T1446Z.jsonl"
    frames = capture_frames(src)
    out = tmp_path / "rec.jsonl"
    with WsServer(frames) as server:
        proc = tapeflow("record", "--feed", "binance", "--symbols", "ftmusdt,sxpbtc,badgerbtc,xmrbtc",
                        "--url", server.url, "-o", str(out), "--frames", str(len(frames)), "--duration", "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"recorded {len(frames):,} frames") and "28 trades" in proc.stdout
    replay = tapeflow("replay", str(out), "--store", str(tmp_path / "r.zarr"), "--no-analytics")
    assert replay.returncode == 0, replay.stderr
    assert "received                 28" in replay.stdout and "reconciles   yes" in replay.stdout


def test_serve_says_when_it_compiles_kernels(monkeypatch, capsys):
    import time

    import flows.cli
    import flows.warmup

    # A warm cache: nothing printed.
    monkeypatch.setattr(flows.warmup, "warm_up", lambda: 0.6)
    flows.cli._warm_up()
    assert capsys.readouterr().out == ""

    # A cold checkout: the notice after 2 s, then how long it took.
    def cold() -> float:
        time.sleep(2.5)
        return 31.2

    monkeypatch.setattr(flows.warmup, "warm_up", cold)
    flows.cli._warm_up()
    assert capsys.readouterr().out.splitlines() == [
        "compiling the flow's kernels (once per checkout, about 30 s)...",
        "kernels compiled in 31 s (cached for the next start)"]
