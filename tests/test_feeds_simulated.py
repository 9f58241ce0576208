"""The simulated market: a deterministic, realistic-looking tape."""
from __future__ import annotations

import re

import numpy as np
import pytest

from flows.feeds import FeedError
from flows.feeds.simulated import SECTORS, SimulatedMarket, listing
from flows.schema import BUY, NS, SELL, SymbolTable, TradeBatch

START = 1_700_000_000 * NS


def tape(duration_s: float = 5.0, **kw) -> tuple[SimulatedMarket, TradeBatch]:
    kw.setdefault("start_ns", START)
    market = SimulatedMarket(kw.pop("symbols", SymbolTable()), **kw)
    return market, TradeBatch.concat(list(market.batches(duration_s)))


def test_listing_looks_like_an_exchange():
    table = SymbolTable()
    market = SimulatedMarket(table, start_ns=START)

    assert len(market.tickers) == 100 and len(table) == 100
    assert len(set(market.tickers)) == 100
    assert all(re.fullmatch(r"[A-Z]{3,4}", t) for t in market.tickers)
    sectors = {table.meta[t]["sector"] for t in market.tickers}
    assert sectors == set(SECTORS) and len(sectors) >= 10
    names = [table.meta[t]["name"] for t in market.tickers]
    assert len(set(names)) == 100 and all(len(n.split()) >= 3 for n in names)
    assert {table.meta[t]["exchange"] for t in market.tickers} == {"SIM"}


def test_listing_is_independent_of_seed_and_scales():
    assert listing(30) == listing(30)
    a = SimulatedMarket(SymbolTable(), seed=1, start_ns=START).tickers
    b = SimulatedMarket(SymbolTable(), seed=2, start_ns=START).tickers
    assert a == b
    big = listing(400)
    assert len({r["ticker"] for r in big}) == 400


@pytest.mark.parametrize("n", [500, 2000])
def test_listing_scales_past_the_first_brands(n):
    rows = listing(n)

    tickers = [r["ticker"] for r in rows]
    names = [r["name"] for r in rows]
    assert len(rows) == n and len(set(tickers)) == n and len(set(names)) == n
    assert all(re.fullmatch(r"[A-Z]{3,4}", t) for t in tickers)
    assert all(len(name.split()) >= 3 for name in names)
    per_sector = {s: sum(r["sector"] == s for r in rows) / n for s in SECTORS}
    for sector, (share, _, _) in SECTORS.items():
        assert per_sector[sector] == pytest.approx(share, abs=0.01)
    assert listing(n) == rows  # deterministic


def test_large_market_registers_every_ticker():
    table = SymbolTable()
    market, trades = tape(1.0, symbols=table, n_symbols=2000, rate=50_000.0)

    assert len(table) == 2000 and len(set(market.tickers)) == 2000
    assert {table.meta[t]["exchange"] for t in market.tickers} == {"SIM"}
    assert len(np.unique(trades.symbol)) > 500


def test_listing_refuses_more_symbols_than_it_can_name():
    with pytest.raises(FeedError, match="at most"):
        listing(10**6)


def test_market_codes_follow_symbols_already_in_the_table():
    table = SymbolTable(["AAPL"])
    market, trades = tape(1.0, symbols=table)

    assert market.codes.min() == 1 and table.names[0] == "AAPL"
    assert set(np.unique(trades.symbol)) <= set(market.codes.tolist())


def test_same_seed_and_start_give_identical_trades():
    _, a = tape(3.0, seed=7)
    _, b = tape(3.0, seed=7)
    _, c = tape(3.0, seed=8)

    for col in TradeBatch.COLUMNS:
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert len(a) != len(c) or not np.array_equal(a.price, c.price)


def test_successive_calls_continue_the_same_tape():
    market = SimulatedMarket(SymbolTable(), seed=3, start_ns=START, batch_ms=250)
    split = list(market.batches(0.75)) + list(market.batches(1.25))
    _, whole = tape(2.0, seed=3, batch_ms=250)

    assert len(split) == 8
    np.testing.assert_array_equal(TradeBatch.concat(split).price, whole.price)
    np.testing.assert_array_equal(TradeBatch.concat(split).time, whole.time)


def test_batches_cover_their_window_sorted_by_time():
    market = SimulatedMarket(SymbolTable(), start_ns=START, batch_ms=100)
    batches = list(market.batches(2.0))

    assert len(batches) == 20
    for k, b in enumerate(batches):
        lo, hi = START + k * NS // 10, START + (k + 1) * NS // 10
        assert len(b) > 0
        assert (np.diff(b.time) >= 0).all()
        assert b.time.min() >= lo and b.time.max() < hi
        assert (b.recv_time > b.time).all() and (b.recv_time - b.time < 50_000_000).all()


def test_prices_sizes_and_sides_are_sane():
    _, t = tape(20.0, seed=5)

    assert (t.price > 0).all() and (t.size > 0).all()
    np.testing.assert_allclose(t.price * 100, np.rint(t.price * 100), atol=1e-6)
    assert (t.size == np.rint(t.size)).all()
    assert set(np.unique(t.side).tolist()) == {SELL, BUY}
    assert 0.35 < (t.side == BUY).mean() < 0.65


def test_trade_ids_increase_per_symbol():
    _, t = tape(10.0, seed=2)

    for code in np.unique(t.symbol):
        ids = t.trade_id[t.symbol == code]
        assert (np.diff(ids) > 0).all()
    assert len(np.unique(t.trade_id * 1000 + t.symbol)) == len(t)


def test_activity_differs_per_symbol():
    _, t = tape(60.0, seed=4)
    counts = np.bincount(t.symbol, minlength=100)
    share = counts / counts.sum()

    assert share.max() > 0.04  # a few names dominate the tape
    assert (share < 0.0005).sum() >= 3  # and some are nearly silent


def test_activity_is_u_shaped_over_the_session():
    _, t = tape(600.0, seed=1, rate=500.0, session_s=600.0)
    per_minute = np.bincount((t.time - START) // (60 * NS), minlength=10)

    assert per_minute[0] > 2 * per_minute[5] and per_minute[-1] > 2 * per_minute[4]
    assert len(t) / 600 == pytest.approx(500.0, rel=0.3)


def test_trades_come_in_bursts():
    # The U-shape changes activity by ~2% over the first two minutes of a 6.5 h session;
    # Poisson arrivals would have a variance-to-mean ratio of per-second counts near 1.
    _, t = tape(120.0, seed=6)
    ratios = []
    for code in np.argsort(np.bincount(t.symbol))[::-1][5:30]:  # busy, not the busiest
        per_second = np.bincount((t.time[t.symbol == code] - START) // NS, minlength=120)
        ratios.append(per_second.var() / per_second.mean())

    assert np.median(ratios) > 1.8  # Poisson: 1 +- 0.13


def test_each_stock_has_its_own_volatility_clusters():
    # Dividing by the minute's cross-sectional median removes the market-wide U-shape and
    # regime; what autocorrelation is left in absolute moves is each stock's own clustering.
    _, t = tape(14_400.0, seed=9, rate=100.0, batch_ms=1000)
    frame = t.to_frame()
    frame["minute"] = frame["time"].dt.floor("1min")
    close = frame.groupby(["minute", "symbol"])["price"].last().unstack().ffill()
    moves = np.log(close).diff().abs().iloc[1:]
    moves = moves.div(moves.median(axis=1), axis=0)
    active = moves.columns[(moves > 0).sum() > 200]
    autocorr = np.nanmean([moves[c].autocorr(1) for c in active])

    assert len(active) > 20 and autocorr > 0.02  # constant volatility gives ~0


def test_realtime_follows_the_injected_clock():
    now = [1_700_000_000_250_000_000]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += int(s * NS)

    market = SimulatedMarket(SymbolTable(), realtime=True, clock=lambda: now[0], sleep=sleep)
    batches = list(market.batches(1.0))

    assert market.start_ns == 1_700_000_000 * NS  # now, floored to the second
    assert len(batches) == 10
    assert now[0] == market.start_ns + NS  # the last batch left when its window closed
    assert sum(slept) == pytest.approx(0.75)


@pytest.mark.parametrize("kw, word", [({"rate": 0}, "rate"), ({"n_symbols": 0}, "n_symbols"),
                                      ({"batch_ms": 0}, "batch_ms")])
def test_bad_parameters_raise_feed_error(kw, word):
    with pytest.raises(FeedError, match=word):
        SimulatedMarket(SymbolTable(), **kw)
