"""Data quality: injected faults lower exactly the components they should; clean data scores 100.

Every test runs a seeded simulated tape through the real :class:`Validator`, :class:`BarEngine`
and :class:`QualityEngine`, wired as the pipeline does (observe after validation, before bars).
"""
from __future__ import annotations

import numpy as np
import pytest

from flows.analytics import frame_fields
from flows.bars import BarConfig, BarEngine
from flows.feeds.simulated import SimulatedMarket
from flows.quality import COMPONENTS, FLAG_REASONS, QualityConfig, QualityEngine
from flows.schema import NS, BarBatch, Quarantine, SymbolTable, TradeBatch
from flows.validate import Validator

MIN = 60 * NS
START = 1_700_000_000 * NS // (15 * MIN) * (15 * MIN)
WINDOW = 30
TFS = ("1m", "5m")
PER_MIN = 120  # 500 ms batches


@pytest.fixture(scope="module")
def tape() -> tuple[tuple[str, ...], list[TradeBatch]]:
    table = SymbolTable()
    market = SimulatedMarket(table, n_symbols=20, rate=300.0, seed=7, start_ns=START, batch_ms=500)
    return table.names, list(market.batches(20 * 60))


def run(names, batches, config: QualityConfig | None = None, unparsed: dict[int, Quarantine] | None = None):
    """Push batches through validation, quality and bars as the pipeline does."""
    table = SymbolTable(names)
    validator = Validator(clock=lambda: 2**62)
    engine = BarEngine(table, BarConfig(timeframes=TFS, window=WINDOW, history=200))
    quality = QualityEngine(config or QualityConfig(window=WINDOW, history=200), TFS)
    flags, moved = [], 0
    for i, batch in enumerate(batches):
        accepted, rejected = validator.process(batch)
        report = quality.observe(batch, accepted, rejected, feed="sim",
                                 unparsed=(unparsed or {}).get(i))
        flags.append(report.flags)
        if report.quarantine is not None:
            moved += int(report.quarantine.sum())
            accepted = accepted.take(~report.quarantine)
        validator.quarantine_late(engine.update(accepted).too_late)
        if i % 50 == 0:
            refresh(quality, engine, table, tail=3)
    refresh(quality, engine, table)
    return quality, engine, table, flags, moved


def refresh(quality, engine, table, tail=None):
    for tf, frame in engine.frames.items():
        start = 0 if tail is None else max(frame.n - tail, 0)
        quality.update(tf, frame.times[: frame.n], frame_fields(frame, len(table)), start)


def lowered(quality, table, tf="1m") -> dict[str, set[tuple[int, str]]]:
    """Cells (minute since START, symbol) below 100, per component and for the score."""
    ds = quality.dataset(tf, table.names)
    minutes = (ds.time.values.astype(np.int64) - START) // MIN
    out = {}
    for name in ("score", *COMPONENTS):
        r, s = np.nonzero(ds[name].values < 100)
        if len(r):
            out[name] = {(int(minutes[a]), table.names[b]) for a, b in zip(r, s)}
    return out


def busiest(batches) -> int:
    tape = TradeBatch.concat(batches)
    return int(np.bincount(tape.symbol).argmax())


def replace(batch: TradeBatch, **columns) -> TradeBatch:
    return TradeBatch(*(columns.get(c, getattr(batch, c)) for c in TradeBatch.COLUMNS))


def test_simulated_ids_are_sequential_per_symbol(tape):
    _, batches = tape
    t = TradeBatch.concat(batches)
    for s in np.unique(t.symbol):
        ids = t.trade_id[t.symbol == s]
        assert (np.diff(ids) == 1).all()


def test_clean_data_scores_100_everywhere(tape):
    names, batches = tape
    quality, engine, table, flags, _ = run(names, batches)
    for tf in TFS:
        ds = quality.dataset(tf, table.names)
        assert ds.sizes["time"] == engine.frames[tf].n
        for name in ("score", *COMPONENTS):
            assert (ds[name].values == 100).all(), (tf, name)
        feed = quality.feed_dataset(tf)
        assert feed.feed.values.tolist() == ["sim"]
        assert (feed.score.values == 100).all()
    assert sum(len(f) for f in flags) == 0
    # The normal gaps were learned (staleness was really judged) and ids are known sequential.
    assert np.isfinite(quality.normal_gap()[: len(table)]).sum() >= 15


def test_one_spike_lowers_only_spike_for_that_symbol_and_bar(tape):
    names, batches = tape
    s = busiest(batches)
    i = 12 * PER_MIN + 60
    while not (batches[i].symbol == s).any():
        i += 1
    k = int(np.flatnonzero(batches[i].symbol == s)[0])
    price = batches[i].price.copy()
    price[k] *= 1.5
    batches = batches[:i] + [replace(batches[i], price=price)] + batches[i + 1:]

    quality, _, table, flags, _ = run(names, batches)

    minute = (int(batches[i].time[k]) - START) // MIN
    assert lowered(quality, table) == {"score": {(minute, names[s])}, "spike": {(minute, names[s])}}
    assert set(lowered(quality, table, "5m")) == {"score", "spike"}
    ds = quality.dataset("1m", table.names).sel(symbol=names[s]).isel(time=minute)
    assert float(ds.score) == pytest.approx(100 - 0.5 * (100 - float(ds.spike)))
    record = [f for f in flags if len(f)]
    assert len(record) == 1 and record[0].counts() == {"spike": 1}
    assert record[0].trade_id[0] == batches[i].trade_id[k] and record[0].detail[0] > 8


def test_quarantine_spikes_moves_the_spike_out_of_the_bars(tape):
    names, batches = tape
    s = busiest(batches)
    i = 12 * PER_MIN
    while not (batches[i].symbol == s).any():
        i += 1
    k = int(np.flatnonzero(batches[i].symbol == s)[0])
    price = batches[i].price.copy()
    price[k] *= 1.5
    batches = batches[:i] + [replace(batches[i], price=price)] + batches[i + 1:]

    _, engine, _, _, moved = run(names, batches, QualityConfig(window=WINDOW, history=200,
                                                                 quarantine_spikes=True))

    assert moved == 1
    assert float(engine.dataset("1m").high.sel(symbol=names[s]).max()) < price[k]


def test_stale_symbol_lowers_only_staleness(tape):
    names, batches = tape
    s = busiest(batches)
    halt = (START + 10 * MIN, START + 16 * MIN)  # the symbol does not trade (ids continue)
    out, dropped = [], 0
    for b in batches:
        gone = (b.symbol == s) & (b.time >= halt[0]) & (b.time < halt[1])
        b = b.take(~gone)
        ids = b.trade_id.copy()
        ids[b.symbol == s] -= dropped
        dropped += int(gone.sum())
        out.append(replace(b, trade_id=ids))

    quality, _, table, _, _ = run(names, out)

    got = lowered(quality, table)
    assert set(got) == {"score", "staleness"}
    assert {m for m, _ in got["staleness"]} == set(range(10, 16))
    assert {n for _, n in got["staleness"]} == {names[s]}
    assert lowered(quality, table, "5m") == {"score": {(10, names[s])}, "staleness": {(10, names[s])}}
    assert quality.feed_dataset("1m").staleness.values.min() < 100


def test_id_gap_lowers_only_id_gaps(tape):
    names, batches = tape
    s = busiest(batches)
    i = 14 * PER_MIN + 20
    while (batches[i].symbol == s).sum() < 2:
        i += 1
    k = int(np.flatnonzero(batches[i].symbol == s)[0])
    keep = np.ones(len(batches[i]), bool)
    keep[k] = False
    batches = batches[:i] + [batches[i].take(keep)] + batches[i + 1:]

    quality, _, table, flags, _ = run(names, batches)

    nxt = int(np.flatnonzero(batches[i].symbol == s)[0])
    minute = (int(batches[i].time[nxt]) - START) // MIN
    assert lowered(quality, table) == {"score": {(minute, names[s])}, "id_gaps": {(minute, names[s])}}
    records = [f for f in flags if len(f)]
    assert len(records) == 1 and records[0].reason[0] == FLAG_REASONS.index("id_gap")
    assert records[0].detail[0] == 1


def test_burst_of_invalid_ticks_lowers_only_rejected(tape):
    names, batches = tape
    s = busiest(batches)
    i = 8 * PER_MIN + 40
    t = int(batches[i].time[0])
    bad = TradeBatch(time=np.full(30, t), symbol=np.full(30, s, np.int32),
                     price=np.r_[np.full(15, np.nan), np.full(15, -1.0)], size=np.ones(30),
                     trade_id=np.full(30, -1), side=np.zeros(30, np.int8), recv_time=np.zeros(30, np.int64))
    batches = batches[:i] + [TradeBatch.concat([batches[i], bad])] + batches[i + 1:]

    quality, _, table, _, _ = run(names, batches)

    minute = (t - START) // MIN
    assert lowered(quality, table) == {"score": {(minute, names[s])}, "rejected": {(minute, names[s])}}
    feed = quality.feed_dataset("1m")
    assert (feed.rejected.values < 100).sum() == 1
    assert set(COMPONENTS) - {"rejected"} <= {c for c in COMPONENTS if (feed[c].values == 100).all()}


def test_unparsable_records_count_for_the_feed_only(tape):
    names, batches = tape
    junk = Quarantine.malformed(["{not json"] * 40)

    quality, _, table, _, _ = run(names, batches, unparsed={9 * PER_MIN: junk})

    assert lowered(quality, table) == {}
    feed = quality.feed_dataset("1m")
    minutes = (feed.time.values.astype(np.int64) - START) // MIN
    assert minutes[np.nonzero(feed.rejected.values[:, 0] < 100)[0]].tolist() == [9]


def test_duplicates_lower_only_duplicates(tape):
    names, batches = tape
    s = busiest(batches)
    i = 11 * PER_MIN + 60
    seen = TradeBatch.concat(batches[i - 5: i])
    again = seen.take(np.flatnonzero(seen.symbol == s)[:5])
    batches = batches[:i] + [TradeBatch.concat([batches[i], again])] + batches[i + 1:]

    quality, _, table, _, _ = run(names, batches)

    minute = (int(again.time[0]) - START) // MIN
    assert lowered(quality, table) == {"score": {(minute, names[s])}, "duplicates": {(minute, names[s])}}


def test_late_trades_lower_only_late(tape):
    names, batches = tape
    s = busiest(batches)
    i = 13 * PER_MIN + 20
    while not (batches[i].symbol == s).any():
        i += 1
    held = batches[i].symbol == s  # delivered two minutes late, inside the window
    j = i + 2 * PER_MIN
    late = batches[i].take(held)
    batches = (batches[:i] + [batches[i].take(~held)] + batches[i + 1: j]
               + [TradeBatch.concat([batches[j], late])] + batches[j + 1:])

    quality, _, table, _, _ = run(names, batches)

    minute = (int(late.time[0]) - START) // MIN
    assert lowered(quality, table) == {"score": {(minute, names[s])}, "late": {(minute, names[s])}}
    assert quality.gaps == {}  # the id gap the held trades opened was closed when they came


def test_broken_bar_lowers_only_ohlc():
    table = SymbolTable(["X", "Y"])
    engine = BarEngine(table, BarConfig(timeframes=TFS, window=WINDOW))
    quality = QualityEngine(QualityConfig(window=WINDOW), TFS)
    validator = Validator(clock=lambda: 2**62)
    bars = BarBatch.from_columns(table, time=[START, START, START + MIN], symbol=["X", "Y", "X"],
                                 open=[10, 20, 10], high=[11, 21, 11], low=[9, 19, 9], close=[10, 20, 10],
                                 volume=[5, 5, 5], trades=[3, 3, 3], vwap=[10, 25, 10])
    accepted, _ = validator.process_bars(bars, "1m")
    engine.update_bars("1m", accepted)

    refresh(quality, engine, table)

    assert lowered(quality, table) == {"score": {(0, "Y")}, "ohlc": {(0, "Y")}}
    assert float(quality.dataset("1m", table.names).score.sel(symbol="Y")[0]) == 0.0


def test_config_rejects_unknown_components():
    with pytest.raises(ValueError, match="unknown quality component"):
        QualityConfig(weights={"spikes": 1.0})


def test_reading_before_any_batch_gives_empty_scores():
    # The served Quality page can read while the flow has named symbols but observed nothing
    # (seen in CI: feed_dataset raised on the 20-column grid the symbol read had widened).
    quality = QualityEngine(QualityConfig(window=WINDOW, history=200), TFS)
    names = tuple(f"S{i:02d}" for i in range(20))
    for tf in TFS:
        ds = quality.dataset(tf, names)
        assert ds.sizes == {"time": 0, "symbol": 20}
        feeds = quality.feed_dataset(tf)
        assert feeds.sizes == {"time": 0, "feed": 0}
    # Observing afterwards still works and scores the new feed.
    table = SymbolTable(names)
    batch = TradeBatch.from_columns(table, time=[START + NS] * 2, symbol=["S00", "S19"],
                                    price=[10.0, 11.0], size=[1.0, 2.0], trade_id=[1, 2])
    accepted, rejected = Validator(clock=lambda: 2**62).process(batch)
    quality.observe(batch, accepted, rejected, feed="sim")
    assert quality.feed_dataset("1m").sizes == {"time": 1, "feed": 1}
    assert quality.dataset("1m", names)["score"].values.tolist() == [[100.0] * 20]
