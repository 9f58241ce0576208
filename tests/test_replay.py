"""Replay of recorded trades: CSV, Parquet and real Binance websocket captures."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.feeds import FeedError
from flows.feeds.replay import Replayer, infer_time_unit, read_binance_capture, read_trades
from flows.schema import BUY, NS, SELL, UNKNOWN_SIDE, Quarantine, SymbolTable, TradeBatch

DATA = Path(__file__).parent / "data"
CAPTURES = sorted(DATA.glob("binance*_ws_combined_*.jsonl"))


def read_all(path, **kw) -> tuple[TradeBatch, Quarantine, int]:
    kw.setdefault("symbols", SymbolTable())
    parts = list(read_trades(path, **kw))
    return (TradeBatch.concat([b for b, _ in parts]), Quarantine.concat([q for _, q in parts]),
            len(parts))


@pytest.fixture
def trades() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 500
    ms = 1_618_677_448_000 + np.sort(rng.integers(0, 60_000, n))
    return pd.DataFrame({
        "time_ms": ms,
        "symbol": rng.choice(["YFIUSDT", "KSMUSDT", "XMRUSDT"], n),
        "price": np.round(rng.uniform(10, 500, n), 3),
        "size": np.round(rng.uniform(0.001, 5, n), 3),
        "trade_id": np.arange(n) + 52_599_685,
        "side": rng.choice(["buy", "sell"], n),
    })


def iso(ms: np.ndarray) -> np.ndarray:
    return pd.to_datetime(ms, unit="ms", utc=True).strftime("%Y-%m-%dT%H:%M:%S.%fZ").to_numpy()


def assert_same(a: TradeBatch, b: TradeBatch, table_a: SymbolTable, table_b: SymbolTable):
    assert len(a) == len(b)
    fa, fb = a.to_frame(table_a), b.to_frame(table_b)
    pd.testing.assert_frame_equal(fa.drop(columns="recv_time"), fb.drop(columns="recv_time"))


def test_csv_iso_and_epoch_ms_and_parquet_give_the_same_trades(tmp_path, trades):
    cols = ["time", "symbol", "price", "size", "trade_id", "side"]
    iso_csv, ms_csv, parquet = tmp_path / "iso.csv", tmp_path / "ms.csv", tmp_path / "t.parquet"
    trades.assign(time=iso(trades.time_ms.to_numpy()))[cols].to_csv(iso_csv, index=False)
    trades.assign(time=trades.time_ms)[cols].to_csv(ms_csv, index=False)
    pq.write_table(pa.Table.from_pandas(
        trades.assign(time=pd.to_datetime(trades.time_ms, unit="ms"))[cols],
        preserve_index=False), parquet)

    tables = [SymbolTable() for _ in range(3)]
    got = [read_all(p, symbols=t, batch_rows=64) for p, t in zip((iso_csv, ms_csv, parquet),
                                                                  tables)]

    for batch, quarantine, parts in got:
        assert len(batch) == 500 and len(quarantine) == 0 and parts == 8
    assert_same(got[0][0], got[1][0], tables[0], tables[1])
    assert_same(got[0][0], got[2][0], tables[0], tables[2])
    first = got[0][0]
    assert first.time[0] == trades.time_ms[0] * 1_000_000
    np.testing.assert_array_equal(first.trade_id, trades.trade_id)
    np.testing.assert_array_equal(first.side, np.where(trades.side == "buy", BUY, SELL))


@pytest.mark.parametrize("unit, scale", [("s", 1e-9), ("ms", 1e-6), ("us", 1e-3), ("ns", 1)])
def test_epoch_units_are_inferred_and_can_be_forced(tmp_path, unit, scale):
    ns = np.array([1_618_677_448_084_000_000, 1_618_677_449_500_000_000])
    values = ns * scale if unit == "s" else (ns * scale).astype(np.int64)
    path = tmp_path / "t.csv"
    pd.DataFrame({"time": values, "symbol": "X", "price": 1.0, "size": 1.0}).to_csv(path,
                                                                                   index=False)

    assert infer_time_unit(values) == unit
    inferred, _, _ = read_all(path)
    forced, _, _ = read_all(path, time_unit=unit)
    np.testing.assert_array_equal(inferred.time, ns)
    np.testing.assert_array_equal(forced.time, ns)


def test_unparsable_rows_are_quarantined_with_reasons_not_dropped(tmp_path):
    path = tmp_path / "dirty.csv"
    path.write_text(
        "time,symbol,price,size,trade_id,side\n"
        "2021-04-17T16:37:28Z,YFIUSDT,49966.7,0.001,1,buy\n"      # good
        "yesterday,YFIUSDT,49966.7,0.001,2,buy\n"                 # bad_time
        "2021-04-17T16:37:29Z,YFIUSDT,abc,0.001,3,sell\n"         # non_finite_price
        "2021-04-17T16:37:29Z,YFIUSDT,49966.7,lots,4,sell\n"      # non_finite_size
        "2021-04-17T16:37:30Z,,49966.7,0.001,5,b\n"               # missing_field (symbol)
        "2021-04-17T16:37:30Z,YFIUSDT,,0.001,6,s\n"               # missing_field (price)
        "2021-04-17T16:37:31Z,YFIUSDT,49966.7,0.001,7x,1\n"       # malformed (trade_id)
        "2021-04-17T16:37:31Z,YFIUSDT,49966.7\n"                  # malformed (too few fields)
        "2021-04-17T16:37:32+02:00,YFIUSDT,-5,0.001,9,-1\n"       # negative price: validate's job
        "2021-04-17 16:37:32.5,YFIUSDT,nan,0,10,?\n"              # NaN/0 values: validate's job
    )
    batch, quarantine, _ = read_all(path, batch_rows=4)

    assert len(batch) + len(quarantine) == 10
    assert quarantine.counts() == {"non_finite_price": 1, "non_finite_size": 1, "bad_time": 1,
                                   "malformed": 2, "missing_field": 2}
    assert batch.trade_id.tolist() == [1, 9, 10]
    assert batch.price[1] == -5 and np.isnan(batch.price[2]) and batch.size[2] == 0
    assert batch.side.tolist() == [BUY, SELL, UNKNOWN_SIDE]
    assert batch.time[1] == pd.Timestamp("2021-04-17T14:37:32Z").value
    assert batch.time[2] == pd.Timestamp("2021-04-17T16:37:32.5Z").value
    assert any("yesterday" in r for r in quarantine.raw)
    assert any(r.startswith("2021-04-17T16:37:31Z,YFIUSDT,49966.7") and "7x" not in r
               for r in quarantine.raw)


def test_parquet_with_garbage_text_and_numeric_epochs(tmp_path):
    path = tmp_path / "t.pq"
    pq.write_table(pa.table({
        "Time": ["1618677448084", "1618677448085", "oops"],
        "Symbol": pa.array(["A", "B", "A"]).dictionary_encode(),
        "Price": ["1.5", "x", "2"],
        "Size": [1.0, 2.0, 3.0],
        "recv_time": [1618677448090, 1618677448091, 1618677448092],
    }), path)
    batch, quarantine, _ = read_all(path)

    assert len(batch) == 1 and batch.time[0] == 1_618_677_448_084_000_000
    assert batch.recv_time[0] == 1_618_677_448_090_000_000
    assert quarantine.counts() == {"non_finite_price": 1, "bad_time": 1}


def test_gzipped_csv_is_read(tmp_path, trades):
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as f:
        trades.rename(columns={"time_ms": "time"}).to_csv(f, index=False)

    batch, quarantine, _ = read_all(path)
    assert len(batch) == 500 and len(quarantine) == 0


def test_missing_column_is_named_with_the_columns_present(tmp_path):
    path = tmp_path / "trades.csv"
    path.write_text("time,symbol,size\n1,X,2\n")

    with pytest.raises(FeedError) as err:
        read_trades(path, symbols=SymbolTable())
    assert str(err.value) == "trades.csv: missing column 'price' (have: time, symbol, size)"

    parquet = tmp_path / "trades.parquet"
    pq.write_table(pa.table({"time": [1], "symbol": ["X"], "price": [1.0]}), parquet)
    with pytest.raises(FeedError, match="missing column 'size'"):
        read_trades(parquet, symbols=SymbolTable())


@pytest.mark.parametrize("name, content, kw, match", [
    ("nowhere.csv", None, {}, "no such file"),
    ("empty.csv", "", {}, "empty file"),
    ("blank.csv", "\n\n", {}, "empty file"),
    ("trades.txt", "time,symbol,price,size\n", {}, "cannot tell the format"),
    ("trades.csv", "time,symbol,price,size\n", {"format": "excel"}, "unknown format 'excel'"),
    ("trades.csv", "time,symbol,price,size\n", {"time_unit": "sec"}, "bad time unit 'sec'"),
    ("fake.parquet", "time,symbol,price,size\n", {}, "not a readable Parquet file"),
])
def test_user_mistakes_raise_one_line_feed_errors(tmp_path, name, content, kw, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)

    with pytest.raises(FeedError, match=match) as err:
        list(read_trades(path, symbols=SymbolTable(), **kw))
    assert "\n" not in str(err.value)
    with pytest.raises(FeedError, match=match):
        Replayer([path], SymbolTable(), **kw)


def test_a_directory_is_not_a_file(tmp_path):
    with pytest.raises(FeedError, match="is a directory"):
        read_trades(tmp_path, symbols=SymbolTable())


# --------------------------------------------------------------------------- Binance captures

def frames(path: Path) -> list[dict]:
    return [json.loads(line)["frame"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name[:24])
def test_capture_trades_are_the_agg_trade_frames(path):
    raw = frames(path)
    agg = [f["data"] for f in raw if f["stream"].endswith("@aggTrade")]
    kinds = Counter(f["stream"].split("@", 1)[1] for f in raw)
    del kinds["aggTrade"]

    table = SymbolTable()
    cap = read_binance_capture(path, table)

    assert len(cap.batches) == len(agg) > 0 and all(len(b) == 1 for b in cap.batches)
    assert cap.ignored == dict(kinds) and "kline_1m" in cap.ignored
    assert cap.frames == len(agg) + sum(cap.ignored.values()) and len(cap.quarantine) == 0
    trades = cap.trades
    assert trades.time.tolist() == [d["T"] * 1_000_000 for d in agg]
    assert trades.trade_id.tolist() == [d["a"] for d in agg]
    assert trades.price.tolist() == [float(d["p"]) for d in agg]
    assert trades.side.tolist() == [SELL if d["m"] else BUY for d in agg]
    assert [table.names[c] for c in trades.symbol] == [d["s"] for d in agg]
    assert cap.agg["raw_trades"].sum() == sum(d["l"] - d["f"] + 1 for d in agg)
    assert len(cap.klines) == kinds["kline_1m"]
    assert str(cap.klines["t"].dtype) == "datetime64[ns]"

    streamed, quarantine, _ = read_all(path, batch_rows=10)
    np.testing.assert_array_equal(streamed.trade_id, trades.trade_id)
    np.testing.assert_array_equal(streamed.recv_time, trades.recv_time)
    assert len(quarantine) == 0


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name[:24])
def test_kline_trade_counts_equal_raw_trades_of_the_agg_trades(path):
    # The captures start mid-minute, so a minute's kline n also counts raw trades from before
    # the capture. What the aggTrades must explain exactly is the change of n between the
    # minute's first and last kline update: the raw ids (f..l) after the first update's L.
    cap = read_binance_capture(path, SymbolTable())
    checked = 0
    for (symbol, minute), updates in cap.klines.groupby(["symbol", "t"]):
        first, last = updates.iloc[0], updates.iloc[-1]
        agg = cap.agg[cap.agg["symbol"] == symbol]
        lo = np.maximum(agg["first_id"], first["last_id"] + 1)
        hi = np.minimum(agg["last_id"], last["last_id"])
        raw = int((hi - lo + 1).clip(lower=0).sum())
        in_minute = agg[agg["time"].dt.floor("1min") == minute]
        assert raw == last["trades"] - first["trades"]
        assert in_minute["raw_trades"].sum() >= raw
        checked += len(updates) > 1
    assert checked > 0


def test_broken_capture_lines_are_quarantined(tmp_path):
    lines = (DATA / CAPTURES[0].name).read_text().splitlines()
    agg = [line for line in lines if "@aggTrade" in line]
    broken = agg[1].replace('"p":', '"price":')
    path = tmp_path / "cap.jsonl"
    path.write_text("\n".join([agg[0], "{not json", broken, lines[0], agg[2]]) + "\n")

    batch, quarantine, _ = read_all(path)
    assert len(batch) == 2
    assert quarantine.counts() == {"malformed": 1, "missing_field": 1}
    replayer = Replayer(path, SymbolTable())
    list(replayer)
    assert replayer.rows_read == 4 and sum(replayer.ignored.values()) == 1


# --------------------------------------------------------------------------- Replayer

def test_replayer_chains_files_and_reports_progress(tmp_path, trades):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    frame = trades.rename(columns={"time_ms": "time"})
    pq.write_table(pa.Table.from_pandas(frame[:200], preserve_index=False), a)
    pq.write_table(pa.Table.from_pandas(frame[200:], preserve_index=False), b)

    replayer = Replayer([a, b], SymbolTable(), batch_rows=100)
    seen = []
    for batch, _ in replayer:
        seen.append((len(batch), replayer.rows_read, replayer.bytes_read))

    assert replayer.rows_total == 500 and replayer.rows_read == 500
    assert [s[1] for s in seen] == [100, 200, 300, 400, 500]
    assert replayer.bytes_read == replayer.total_bytes
    assert all(x[2] <= y[2] for x, y in zip(seen, seen[1:]))


def test_replayer_paces_by_event_time():
    now = [0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += int(s * NS)

    path = CAPTURES[2]
    replayer = Replayer(path, SymbolTable(), speed=10.0, clock=lambda: now[0], sleep=sleep)
    batches = [b for b, _ in replayer]
    trades = TradeBatch.concat(batches)
    span = (np.maximum.accumulate(trades.time)[-1] - trades.time[0]) / NS

    assert len(trades) == len(read_binance_capture(path, SymbolTable()).batches)
    assert len(batches) > 10
    assert now[0] / NS == pytest.approx(span / 10.0, abs=0.01)
    unpaced = Replayer(path, SymbolTable(), clock=lambda: 0, sleep=lambda s: 1 / 0)
    assert sum(len(b) for b, _ in unpaced) == len(trades)
