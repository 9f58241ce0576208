"""Data quality through the whole flow: an injected spike is scored, flagged and stored."""
from __future__ import annotations

import numpy as np
import xarray as xr

from flows.feeds.simulated import SimulatedMarket
from flows.pipeline import Flow, FlowConfig
from flows.schema import NS, TradeBatch


def test_spike_lowers_its_cell_and_is_flagged_in_the_store(tmp_path):
    path = tmp_path / "q.zarr"
    flow = Flow(FlowConfig(store=str(path)))
    market = SimulatedMarket(flow.table, n_symbols=10, rate=200, start_ns=1_700_000_040 * NS, batch_ms=1000)
    batches = list(market.batches(600))
    victim = batches[300]
    i = int(np.flatnonzero(victim.symbol == victim.symbol[0])[0])
    price = victim.price.copy()
    price[i] *= 1.5  # a bad print, 50 % off the market
    batches[300] = TradeBatch(victim.time, victim.symbol, price, victim.size, victim.trade_id,
                              victim.side, victim.recv_time, victim.count)
    for b in batches:
        flow.push(b)
    flow.close()
    q = xr.open_zarr(path, group="quality/1m").load()
    symbol = flow.table.names[int(victim.symbol[i])]
    minute = np.datetime64(int(victim.time[i] // (60 * NS) * 60 * NS), "ns")
    cell = q.sel(symbol=symbol, time=minute)
    assert float(cell.spike) < 100 and float(cell.score) < 100
    others = q.drop_sel(symbol=symbol)
    assert float(others.spike.min()) == 100.0  # nothing else was a spike
    flags = xr.open_zarr(path, group="quality_flags").load()
    assert "spike" in flags.reason.values.tolist()
    assert int(flags.trade_id.values[flags.reason.values.tolist().index("spike")]) == int(victim.trade_id[i])
    assert flow.counters.reconciles()


def test_quality_rule_fires_on_the_spiked_symbol(tmp_path):
    from flows.alerts import Rule

    flow = Flow(FlowConfig(store=str(tmp_path / "a.zarr"), alerts=str(tmp_path / "alerts.yaml")))
    flow.alerts.add_rule(Rule.parse("* quality_spike < 100 on 1m"))
    market = SimulatedMarket(flow.table, n_symbols=10, rate=200, start_ns=1_700_000_040 * NS, batch_ms=1000)
    batches = list(market.batches(600))
    victim = batches[300]
    price = victim.price.copy()
    price[0] *= 1.5
    batches[300] = TradeBatch(victim.time, victim.symbol, price, victim.size, victim.trade_id,
                              victim.side, victim.recv_time, victim.count)
    fired = []
    flow.alerts.subscribe(fired.append)
    for i, b in enumerate(batches):
        flow.push(b)
        if i % 60 == 0:
            flow.flush()
    flow.close()
    assert [a.symbol for a in fired] == [flow.table.names[int(victim.symbol[0])]]
    assert (tmp_path / "alerts.jsonl").read_text().count("\n") == 1
