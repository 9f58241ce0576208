"""Venue parsers: Coinbase on its real capture, Polygon on documented frames, the PSX board."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.feeds.coinbase import CoinbaseParser, capture_frames, subscribe_message
from flows.feeds.polygon import PolygonParser, auth_message
from flows.feeds.polygon import subscribe_message as polygon_subscribe
from flows.feeds.psx import PsxBoard, SessionHours, read_board, read_sector_codes
from flows.pipeline import Flow, FlowConfig
from flows.schema import BUY, NO_ID, NS, REASONS, SELL, SymbolTable

DATA = Path(__file__).parent / "data"
COINBASE = DATA / "coinbase_pro_ws_matches_ticker_2021-04-17.jsonl"
MATCHES = ("match", "last_match")


def _frames() -> list[tuple[dict, int]]:
    return list(capture_frames(COINBASE))


# --------------------------------------------------------------------------- Coinbase

def test_coinbase_capture_every_match_frame_is_one_trade():
    frames = _frames()
    table = SymbolTable()
    parser = CoinbaseParser(table)
    per_frame, ignored = [], {}
    for frame, recv_ns in frames:
        trades, bad, info = parser.parse(frame, recv_ns)
        assert len(bad) == 0
        per_frame.append(len(trades))
        for k, v in info.get("ignored", {}).items():
            ignored[k] = ignored.get(k, 0) + v
        assert "gaps" not in info and "out_of_order" not in info
    is_match = [f["type"] in MATCHES for f, _ in frames]
    assert per_frame == [int(m) for m in is_match]
    assert sum(per_frame) == 107
    assert ignored == {"ticker": 107, "subscriptions": 3}


def test_coinbase_capture_fields_match_pandas_oracle():
    frames = _frames()
    table = SymbolTable()
    parser = CoinbaseParser(table)
    rows = []
    for frame, recv_ns in frames:
        trades, _, _ = parser.parse(frame, recv_ns)
        if len(trades):
            rows.append(trades.to_frame(table))
    got = pd.concat(rows, ignore_index=True)
    want = pd.DataFrame([dict(f, recv_ns=r) for f, r in frames if f["type"] in MATCHES])
    assert got["symbol"].tolist() == want["product_id"].tolist()
    assert got["trade_id"].tolist() == want["trade_id"].tolist()
    np.testing.assert_array_equal(got["price"], want["price"].astype(float))
    np.testing.assert_array_equal(got["size"], want["size"].astype(float))
    want_time = pd.to_datetime(want["time"], utc=True).dt.tz_localize(None).astype("datetime64[ns]")
    np.testing.assert_array_equal(got["time"].to_numpy(), want_time.to_numpy())
    # ``side`` is the maker's; the aggressor is the other side.
    assert got["side"].tolist() == [BUY if s == "sell" else SELL for s in want["side"]]
    assert got["recv_time"].tolist() == want["recv_ns"].tolist()


def test_coinbase_capture_through_a_flow_reconciles():
    flow = Flow(FlowConfig(store=None, timeframes=("1m",), analytics=False, quality=False))
    parser = CoinbaseParser(flow.table)
    for frame, recv_ns in _frames():
        trades, bad, _ = parser.parse(frame, recv_ns)
        flow.push(trades, bad)
    c = flow.counters
    assert (c.received, c.accepted, c.duplicates) == (107, 107, 0) and c.reconciles()


def test_coinbase_gap_detected_when_a_match_is_removed():
    frames = _frames()
    skl = [i for i, (f, _) in enumerate(frames)
           if f["type"] == "match" and f["product_id"] == "SKL-USD"]
    drop = skl[10]
    lost = frames[drop][0]
    parser = CoinbaseParser(SymbolTable())
    gaps = []
    for i, (frame, recv_ns) in enumerate(frames):
        if i != drop:
            gaps += parser.parse(frame, recv_ns)[2].get("gaps", [])
    assert gaps == [{"product_id": "SKL-USD", "after_trade_id": lost["trade_id"] - 1,
                     "next_trade_id": lost["trade_id"] + 1, "missing": 1}]
    assert (parser.gaps, parser.missing, parser.trades) == (1, 1, 106)


def test_coinbase_replayed_frame_is_out_of_order_not_a_gap():
    frames = [f for f, _ in _frames() if f["type"] in MATCHES][:3]
    parser = CoinbaseParser(SymbolTable())
    for f in frames:
        parser.parse(f, 0)
    trades, _, info = parser.parse(frames[1], 0)
    assert len(trades) == 1  # still a trade: the validator counts it as a duplicate
    assert "gaps" not in info and info["out_of_order"][0]["sequence"] == frames[1]["sequence"]


def test_coinbase_bad_frames_are_quarantined_and_the_rest_parsed():
    good = next(f for f, _ in _frames() if f["type"] == "match")
    no_price = {k: v for k, v in good.items() if k != "price"}
    bad_time = dict(good, time="yesterday", trade_id=good["trade_id"] + 1)
    parser = CoinbaseParser(SymbolTable())
    trades, bad, _ = parser.parse([good, no_price, bad_time, 7], recv_ns=0)
    assert len(trades) == 1
    assert bad.counts() == {"malformed": 2, "missing_field": 1}
    trades, bad, _ = parser.parse(b"{not json", recv_ns=0)
    assert len(trades) == 0 and bad.counts() == {"malformed": 1} and bad.raw == ["{not json"]


def test_coinbase_error_frame_and_subscribe():
    _, _, info = CoinbaseParser(SymbolTable()).parse(
        '{"type":"error","message":"Failed to subscribe","reason":"FOO-BAR is not a valid '
        'product"}', 0)
    assert info["fatal"] == "Failed to subscribe: FOO-BAR is not a valid product"
    assert subscribe_message(["BAND-GBP"]) == {"type": "subscribe", "product_ids": ["BAND-GBP"],
                                               "channels": ["matches"]}
    with pytest.raises(ValueError):
        subscribe_message("BTC-USD")


# --------------------------------------------------------------------------- Polygon
# Events in the format of Polygon's stocks websocket reference (T, AM and status messages).

T1 = {"ev": "T", "sym": "MSFT", "x": 4, "i": "12345", "z": 3, "p": 114.125, "s": 100,
      "c": [0, 12], "t": 1536036818784, "q": 3681328}
T2 = {"ev": "T", "sym": "MSFT", "x": 11, "i": "12345", "z": 3, "p": 114.13, "s": 50,
      "c": [37], "t": 1536036818785, "q": 3681329}
T3 = {"ev": "T", "sym": "AAPL", "x": 12, "i": "71675577320245", "z": 3, "p": 226.87, "s": 1,
      "t": 1536036818790}
AM1 = {"ev": "AM", "sym": "GTE", "v": 4110, "av": 9470157, "op": 0.4372, "vw": 0.4488,
       "o": 0.4488, "c": 0.4486, "h": 0.4489, "l": 0.4486, "a": 0.4352, "z": 685,
       "s": 1610144640000, "e": 1610144700000}
AM2 = dict(AM1, sym="MSFT", o=114.0, h=114.2, l=113.9, c=114.1, v=20000, vw=114.05,
           s=1610144700000, e=1610144760000)


def test_polygon_mixed_frame():
    frame = [{"ev": "status", "status": "connected", "message": "Connected Successfully"},
             T1, AM1, T2, AM2, T3]
    table = SymbolTable()
    trades, bad, info = PolygonParser(table).parse(json.dumps(frame).encode(), recv_ns=5)
    df = trades.to_frame(table)
    assert df["symbol"].tolist() == ["MSFT", "MSFT", "AAPL"]
    assert df["price"].tolist() == [114.125, 114.13, 226.87]
    assert df["size"].tolist() == [100, 50, 1]
    assert trades.time.tolist() == [1536036818784 * 10**6, 1536036818785 * 10**6,
                                    1536036818790 * 10**6]
    # q (unique per symbol) is the trade id; the exchange-scoped i is not; no q -> no id.
    assert trades.trade_id.tolist() == [3681328, 3681329, NO_ID]
    assert trades.recv_time.tolist() == [5, 5, 5] and len(bad) == 0
    bars = info["bars"]
    assert [table.names[c] for c in bars.symbol] == ["GTE", "MSFT"]
    assert bars.time.tolist() == [1610144640000 * 10**6, 1610144700000 * 10**6]
    assert bars.open.tolist() == [0.4488, 114.0] and bars.volume.tolist() == [4110, 20000]
    assert bars.vwap.tolist() == [0.4488, 114.05] and bars.trades.tolist() == [0, 0]
    assert info["status"] == [{"status": "connected", "message": "Connected Successfully"}]


def test_polygon_malformed_entries_quarantined_rest_parsed():
    no_price = {k: v for k, v in T1.items() if k != "p"}
    text_price = dict(T2, p="114.13")
    frame = [T1, no_price, 42, dict(AM1, h=None), text_price, {"ev": "Q", "sym": "MSFT"},
             {"no": "ev"}, AM2, T3]
    trades, bad, info = PolygonParser(SymbolTable()).parse(frame, recv_ns=0)
    assert len(trades) == 2 and len(info["bars"]) == 1
    assert bad.counts() == {"malformed": 4, "missing_field": 1}
    assert info["ignored"] == {"Q": 1}
    assert json.loads(bad.raw[0]) == no_price


def test_polygon_am_bars_feed_a_flow():
    flow = Flow(FlowConfig(store=None, timeframes=("1m",), analytics=False, quality=False),
                clock=lambda: 1610144760000 * 10**6)
    _, _, info = PolygonParser(flow.table).parse([AM1, AM2], recv_ns=0)
    flow.push_bars("1m", info["bars"])
    assert flow.bars("1m", "GTE")["close"].tolist() == [0.4486]
    assert flow.bars("1m", "MSFT")["volume"].tolist() == [20000]


def test_polygon_auth_flow_and_messages():
    p = PolygonParser(SymbolTable())
    _, _, info = p.parse('[{"ev":"status","status":"auth_success","message":"authenticated"}]', 0)
    assert info["authenticated"] is True and "fatal" not in info and p.authenticated
    _, _, info = p.parse('[{"ev":"status","status":"success","message":"subscribed to: T.*"}]', 0)
    assert "fatal" not in info
    _, _, info = p.parse('[{"ev":"status","status":"auth_failed",'
                         '"message":"authentication failed"}]', 0)
    assert info["fatal"] == "auth_failed: authentication failed" and not p.authenticated
    assert auth_message("abc") == {"action": "auth", "params": "abc"}
    assert polygon_subscribe() == {"action": "subscribe", "params": "T.*,AM.*"}
    assert polygon_subscribe("T.AAPL, AM.AAPL") == {"action": "subscribe",
                                                   "params": "T.AAPL,AM.AAPL"}
    with pytest.raises(ValueError):
        auth_message("")


# --------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
anything = json_values | st.integers(min_value=-(2**80), max_value=2**80) | st.floats()


def _fields(names, fixed):
    return st.fixed_dictionaries(fixed, optional={n: anything | st.text(max_size=30)
                                                  for n in names})


coinbase_like = _fields(["trade_id", "side", "size", "price", "product_id", "sequence", "time"],
                        {"type": st.sampled_from(["match", "last_match", "ticker", "error"])})
polygon_like = st.lists(
    _fields(["sym", "p", "s", "t", "q", "o", "h", "l", "c", "v", "vw", "status", "message"],
            {"ev": st.sampled_from(["T", "AM", "status", "XQ"])}) | json_values, max_size=5)


@settings(max_examples=150, deadline=None)
@given(frame=coinbase_like | json_values)
def test_fuzz_coinbase_never_raises(frame):
    parser = CoinbaseParser(SymbolTable())
    for form in (frame, json.dumps(frame)):
        trades, bad, _ = parser.parse(form, 0)
        if isinstance(frame, dict) and frame.get("type") in MATCHES:
            assert len(trades) + len(bad) == 1
        elif not isinstance(frame, list):
            assert len(trades) == 0


@settings(max_examples=150, deadline=None)
@given(frame=polygon_like | json_values)
def test_fuzz_polygon_never_raises(frame):
    for form in (frame, json.dumps(frame)):
        trades, bad, info = PolygonParser(SymbolTable()).parse(form, 0)
        if isinstance(frame, list):  # every event lands somewhere
            accounted = (len(trades) + len(bad) + len(info.get("bars", ())) +
                         len(info.get("status", ())) + sum(info.get("ignored", {}).values()))
            assert accounted == len(frame)


REAL_MATCH = {"type": "match", "trade_id": 881614, "side": "sell", "size": "0.14",
              "price": "14.7816", "product_id": "BAND-GBP", "sequence": 333939588,
              "time": "2021-04-17T16:43:44.081925Z"}


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(REAL_MATCH) + sorted(T1) + sorted(AM1)),
       value=anything | st.text(max_size=40))
def test_fuzz_real_frames_with_one_field_changed(field, value):
    """A real frame with one field replaced: one trade/bar, or one quarantine record."""
    cb = CoinbaseParser(SymbolTable())
    trades, bad, info = cb.parse(dict(REAL_MATCH, **{field: value}), 0)
    if REAL_MATCH["type"] == dict(REAL_MATCH, **{field: value})["type"]:
        assert len(trades) + len(bad) == 1
    events = [dict(T1, **{field: value}), dict(AM1, **{field: value})]
    trades, bad, info = PolygonParser(SymbolTable()).parse(events, 0)
    accounted = (len(trades) + len(bad) + len(info.get("bars", ())) +
                 len(info.get("status", ())) + sum(info.get("ignored", {}).values()))
    assert accounted == 2


@settings(max_examples=150, deadline=None)
@given(payload=json_values.map(json.dumps) | st.text(max_size=200) |
       st.lists(st.sampled_from(["<table>", "</table>", "<tr>", "<th>", "<td>", "SYMBOL",
                                 "VOLUME", "CURRENT", "HBL", "1,000", "x", "-", "</td>"]),
                max_size=30).map("".join))
def test_fuzz_psx_board_never_raises(payload):
    board = PsxBoard(SymbolTable())
    for t in (TUE_1000, TUE_1000 + 5 * NS):
        trades, _, _ = board.parse(payload, t)
        assert len(trades) == 0 or t > TUE_1000


# --------------------------------------------------------------------------- PSX board

TUE_1000 = int(pd.Timestamp("2021-04-20 10:00", tz="Asia/Karachi").value)  # a Tuesday
SAMPLE_HTML = (DATA / "psx_board_sample.html").read_text()
SAMPLE_JSON = (DATA / "psx_board_sample.json").read_text()
SECTORS = read_sector_codes(DATA / "psx_sector_codes_2021.csv")


def at(local: str) -> int:
    return int(pd.Timestamp(local, tz="Asia/Karachi").value)


def _board(volumes: dict[str, float] | None = None, prices: dict[str, float] | None = None) -> str:
    rows = json.loads(SAMPLE_JSON)["data"]
    for r in rows:
        r["volume"] = (volumes or {}).get(r["symbol"], r["volume"])
        r["current"] = (prices or {}).get(r["symbol"], r["current"])
    return json.dumps(rows)


def test_psx_html_and_json_samples_parse_identically():
    html, js = read_board(SAMPLE_HTML), read_board(SAMPLE_JSON.encode())
    assert len(html) == len(js) == 25 and html.bad == js.bad == []
    assert html.symbol == js.symbol and html.sector == js.sector
    for col in ("last", "change", "open", "high", "low", "volume"):
        np.testing.assert_array_equal(getattr(html, col), getattr(js, col))
    assert html.volume[0] == 14_532_500 and np.isnan(html.open[-1])  # "14,532,500" and "-"


def test_psx_sector_codes_become_symbol_metadata():
    table = SymbolTable()
    PsxBoard(table, sectors=SECTORS).parse(SAMPLE_HTML, TUE_1000)
    assert table.meta["HBL"] == {"exchange": "PSX", "sector": "COMMERCIAL BANKS",
                                 "sector_code": "0807"}
    assert table.meta["LUCK"]["sector"] == "CEMENT"
    assert table.meta["MZNPETF"]["sector"] == "EXCHANGE TRADED FUNDS"


def test_psx_volume_deltas_become_synthetic_trades():
    table = SymbolTable()
    board = PsxBoard(table)
    trades, bad, info = board.parse(_board(), TUE_1000)
    assert len(trades) == 0 and len(bad) == 0 and info["baseline"] == 25  # first snapshot
    base = read_board(SAMPLE_JSON)
    vol = dict(zip(base.symbol, base.volume))
    t1 = TUE_1000 + 5 * NS
    trades, bad, info = board.parse(
        _board({"HBL": vol["HBL"] + 500, "OGDC": vol["OGDC"] + 12_000, "MZNPETF": 1_000},
               {"HBL": 756.5}), t1)
    df = trades.to_frame(table)
    assert df["symbol"].tolist() == ["HBL", "OGDC", "MZNPETF"]
    assert df["size"].tolist() == [500, 12_000, 1_000]
    assert df["price"].tolist()[0] == 756.5
    assert set(trades.time.tolist()) == {t1} and trades.count.tolist() == [1, 1, 1]
    assert trades.trade_id.tolist() == [NO_ID] * 3 and trades.side.tolist() == [0, 0, 0]
    assert len(bad) == 0 and info["baseline"] == 0
    second = _board({"HBL": vol["HBL"] + 500, "OGDC": vol["OGDC"] + 12_000, "MZNPETF": 1_000})
    trades, bad, _ = board.parse(second, t1 + 5 * NS)  # nothing traded since
    assert len(trades) == 0 and len(bad) == 0


def test_psx_decrease_is_quarantined_and_not_double_counted():
    table = SymbolTable()
    board = PsxBoard(table)
    board.parse(_board({"HBL": 10_000}), TUE_1000)
    trades, bad, _ = board.parse(_board({"HBL": 9_000}), TUE_1000 + 5 * NS)
    assert len(trades) == 0 and len(bad) == 1
    assert REASONS[bad.reason[0]] == "malformed" and table.names[bad.symbol[0]] == "HBL"
    assert bad.raw == ["HBL: cumulative volume decreased from 10000 to 9000"]
    assert bad.size.tolist() == [-1000] and bad.time.tolist() == [TUE_1000 + 5 * NS]
    trades, bad, _ = board.parse(_board({"HBL": 10_400}), TUE_1000 + 10 * NS)
    assert trades.size.tolist() == [400] and len(bad) == 0  # measured from the higher total


def test_psx_no_trades_outside_session_hours():
    board = PsxBoard(SymbolTable())
    board.parse(_board({"HBL": 10_000}), at("2021-04-20 15:25"))
    trades, _, info = board.parse(_board({"HBL": 10_700}), at("2021-04-20 15:31"))
    assert len(trades) == 0 and not info["in_session"] and info["off_session_volume"] == 700
    trades, _, _ = board.parse(_board({"HBL": 10_900}), at("2021-04-24 11:00"))  # Saturday
    assert len(trades) == 0
    trades, _, _ = board.parse(_board({"HBL": 11_000}), at("2021-04-24 11:05"))
    assert len(trades) == 0


def test_psx_new_session_resets_cumulative_volume():
    board = PsxBoard(SymbolTable())
    board.parse(_board({"HBL": 10_000}), at("2021-04-20 15:00"))
    # Next morning, before the open, the board still shows yesterday's total: a baseline.
    trades, _, info = board.parse(_board({"HBL": 10_000}), at("2021-04-21 09:10"))
    assert len(trades) == 0 and info["baseline"] == 25
    trades, _, _ = board.parse(_board({"HBL": 10_000}), at("2021-04-21 09:30"))  # not zeroed yet
    assert len(trades) == 0
    # Zeroed at the open and 300 traded since: a reset, not a data error.
    trades, bad, info = board.parse(_board({"HBL": 300}), at("2021-04-21 09:31"))
    assert trades.size.tolist() == [300] and len(bad) == 0 and info["resets"] == 1
    trades, bad, _ = board.parse(_board({"HBL": 250}), at("2021-04-21 09:32"))
    assert len(trades) == 0 and len(bad) == 1  # now a drop inside the session is an error
    # A first snapshot of a new day taken inside the session is just the baseline.
    trades, _, info = board.parse(_board({"HBL": 5_000}), at("2021-04-22 11:00"))
    assert len(trades) == 0 and info["baseline"] == 25


def test_psx_session_is_configurable():
    board = PsxBoard(SymbolTable(), session=SessionHours(open="10:30", close="13:00",
                                                         holidays=frozenset({pd.Timestamp(
                                                             "2021-04-21").date()})))
    board.parse(_board({"HBL": 100}), at("2021-04-20 10:00"))
    assert len(board.parse(_board({"HBL": 200}), at("2021-04-20 10:15"))[0]) == 0
    assert board.parse(_board({"HBL": 300}), at("2021-04-20 10:45"))[0].size.tolist() == [100]
    board.parse(_board({"HBL": 100}), at("2021-04-21 10:40"))
    assert len(board.parse(_board({"HBL": 200}), at("2021-04-21 10:45"))[0]) == 0  # holiday
    with pytest.raises(ValueError):
        SessionHours(open="15:30", close="09:30")


def test_psx_bad_rows_and_unreadable_boards():
    html = SAMPLE_HTML.replace("14,532,500", "lots")
    board = PsxBoard(SymbolTable())
    trades, bad, info = board.parse(html, TUE_1000)
    assert info["rows"] == 24 and bad.counts() == {"malformed": 1} and "lots" in bad.raw[0]
    trades, bad, info = board.parse("<html><body>Service temporarily unavailable</body></html>",
                                    TUE_1000)
    assert len(trades) == 0 and bad.counts() == {"malformed": 1}
    assert info["error"].startswith("unreadable board")
