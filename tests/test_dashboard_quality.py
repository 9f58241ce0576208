"""The quality page without a browser: what its tables and chart would show for a real flow fed
with bad ticks, what a click and the filters do, and how live updates reach the figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from bokeh.document import Document

from dashboards.candles import DOWN_COLOR, UP_COLOR
from dashboards.quality import GOOD, WARN_COLOR, QualityView, latest_scores
from dashboards.source import FrameSource
from dashboards.state import AppState
from flows.feeds.health import FeedHealth
from flows.pipeline import Flow, FlowConfig
from flows.quality import COMPONENTS
from flows.schema import NS, Quarantine, TradeBatch

T0 = 1_700_000_040 * NS  # a minute boundary
SYMBOLS = ["AAA", "BBB", "CCC", "DDD"]
MINUTES = 10


def clean_trades(flow: Flow, minutes: int = MINUTES) -> TradeBatch:
    """Every symbol trades every 5 s with sequential ids, drifting up a little."""
    n = minutes * 12
    t = np.repeat(T0 + np.arange(n) * 5 * NS, len(SYMBOLS))
    symbol = np.tile(SYMBOLS, n)
    price = 100 + np.repeat(np.arange(n), len(SYMBOLS)) * 0.01
    trade_id = np.repeat(np.arange(n), len(SYMBOLS))
    return TradeBatch.from_columns(flow.table, time=t, symbol=symbol, price=price,
                                   size=np.ones(len(t)), trade_id=trade_id)


def push_bad_ticks(flow: Flow, at: int) -> None:
    """In the minute of ``at``: BBB gets two invalid prices and a duplicate, CCC a bad size,
    and the feed an unparsable payload."""
    flow.push(TradeBatch.from_columns(
        flow.table, time=[at, at + NS, at + 2 * NS, at + 3 * NS],
        symbol=["BBB", "BBB", "BBB", "CCC"], price=[-1.0, np.nan, 100.0, 100.0], size=[1.0, 1.0, 1.0, 0.0],
        trade_id=[10_000, 10_001, 0, 10_002]))
    flow.push(TradeBatch(), unparsed=Quarantine.malformed(['{"p": oops']))


@pytest.fixture
def flow() -> Flow:
    flow = Flow(FlowConfig(store=None, timeframes=("1m", "5m")),
                clock=lambda: T0 + 3600 * NS)
    flow.push(clean_trades(flow))
    push_bad_ticks(flow, T0 + (MINUTES - 1) * 60 * NS + 2 * NS)
    return flow


@pytest.fixture
def view(flow: Flow) -> QualityView:
    return QualityView(AppState.from_source(flow), flow)


def record_events(view: QualityView) -> list[tuple[str, str]]:
    """Return a list collecting (event, model name) for changes to the view's document."""
    events: list[tuple[str, str]] = []
    doc = Document()
    doc.add_root(view._layout.get_root(doc))
    doc.on_change(lambda e: events.append((type(e).__name__, getattr(e.model, "name", None)
                                           or type(e.model).__name__)))
    return events


# -- scores ------------------------------------------------------------------------------------


def test_scores_table_is_worst_first_and_is_the_flows_latest_row(view: QualityView,
                                                                 flow: Flow) -> None:
    last = flow.quality("1m").isel(time=-1)
    expected = pd.DataFrame({c: np.asarray(last[c].values, dtype=float)
                             for c in ("score", *COMPONENTS)},
                            index=np.asarray(last["symbol"].values, dtype=object))

    scores = view.scores

    assert scores["symbol"].iloc[0] == expected["score"].idxmin() == "BBB"
    assert scores["score"].iloc[0] == expected["score"].min() < GOOD
    assert list(scores["score"]) == sorted(scores["score"])
    assert sorted(scores["symbol"]) == sorted(expected.index)
    for _, row in scores.iterrows():  # every component of every symbol, as the flow has it
        assert row[["score", *COMPONENTS]].tolist() == expected.loc[row["symbol"]].tolist()
    assert scores.set_index("symbol").loc["BBB", "rejected"] < 100  # bad prices
    assert scores.set_index("symbol").loc["CCC", "rejected"] < 100  # bad size
    assert "BBB" in view._summary.object and "below 90" in view._summary.object


def test_low_scores_get_a_colour_cue(view: QualityView) -> None:
    data = view._scores.data
    for score, color in zip(data["score"], data["score_color"]):
        assert color == (UP_COLOR if score >= GOOD else WARN_COLOR if score >= 50
                         else DOWN_COLOR)
    bbb = list(data["symbol"]).index("BBB")
    assert data["rejected_color"][bbb] == DOWN_COLOR  # the component that lowered it


def test_timeframe_selects_the_scores_shown(view: QualityView, flow: Flow) -> None:
    view.state.timeframe = "5m"

    expected = latest_scores(flow.quality("5m"))
    pd.testing.assert_frame_equal(view.scores, expected, check_dtype=False)
    assert view._tf_input.value == "5m"

    view._tf_input.value = "1m"  # the buttons set the state
    assert view.state.timeframe == "1m"


def test_clicking_a_score_row_shows_that_symbols_history(view: QualityView, flow: Flow) -> None:
    row = list(view._scores.data["symbol"]).index("CCC")

    view._scores.selected.indices = [row]  # what a tap in the browser syncs

    expected = flow.quality("1m").sel(symbol="CCC")
    assert view.state.symbol == "CCC" and view._scores.selected.indices == []
    np.testing.assert_array_equal(view.history["time"], expected["time"].values)
    for name in ("score", *COMPONENTS):
        np.testing.assert_array_equal(view.history[name], expected[name].values.astype(float))
    assert view.history_figure.title.text.startswith("CCC · 1m")


def test_history_lines_are_toggled_from_the_legend(view: QualityView) -> None:
    legend = view.history_figure.right[0]

    assert legend.click_policy == "hide"
    assert legend.items[0].label["value"] == "score"
    assert len(legend.items) == 1 + len(COMPONENTS)


# -- quarantine --------------------------------------------------------------------------------


def test_quarantine_shows_the_flows_log_newest_first(view: QualityView, flow: Flow) -> None:
    log = flow.quarantine_log()

    shown = view.quarantine

    assert shown["reason"].tolist() == log["reason"].tolist()
    assert shown["symbol"].tolist() == log["symbol"].astype(str).tolist()
    malformed = shown[shown["reason"] == "malformed"].iloc[0]
    assert np.isnan(malformed["time"]) and malformed["raw"] == '{"p": oops'  # unparsable
    assert list(view._reason_input.options) == sorted(set(log["reason"]))


def test_filtering_by_reason_keeps_exactly_those_rows(view: QualityView, flow: Flow) -> None:
    log = flow.quarantine_log()
    wanted = ["non_positive_price", "non_positive_size"]

    view._reason_input.value = wanted  # the widget sets the view's filter

    expected = log[log["reason"].isin(wanted)]
    assert view.reasons == wanted
    assert view.quarantine["reason"].tolist() == expected["reason"].tolist()
    assert view.quarantine["symbol"].tolist() == expected["symbol"].tolist() == ["CCC", "BBB"]

    view.reasons = []
    assert len(view.quarantine) == len(log) and view._reason_input.value == []


def test_filtering_by_symbol_text(view: QualityView, flow: Flow) -> None:
    view._symbol_input.value_input = "bb"  # as typed

    assert view.symbol_filter == "bb"
    assert set(view.quarantine["symbol"]) == {"BBB"}
    assert len(view.quarantine) == int((flow.quarantine_log()["symbol"] == "BBB").sum())


# -- feeds -------------------------------------------------------------------------------------


def test_feeds_show_health_and_the_feeds_score(view: QualityView, flow: Flow) -> None:
    feed_score = float(flow.quality_feeds("1m")["score"].isel(time=-1).sel(feed="simulated"))

    row = view.feeds.set_index("feed").loc["simulated"]

    assert row["state"] == flow.status()["state"]
    assert row["score"] == feed_score < 100
    assert row["reconnects"] == 0 and np.isnan(row["lag_ms_p50"])  # not reported: "—"


def test_a_venue_feeds_health_is_shown_with_its_state_coloured(view: QualityView,
                                                               flow: Flow) -> None:
    health = FeedHealth(
        feed="binance-spot", state="FAILED", reason="circuit breaker", state_for_s=5.0,
        messages_per_s=12.5, trades_per_s=30.0, lag_ms_p50=4.0, lag_ms_p90=20.0, lag_ms_p99=80.0,
        frames=100, trades=300, connects=4, reconnects=3, gaps=2, missing_ids=7, overlap=0,
        dropped_frames=0, dropped_trades=0, quarantined=0, last_error="HTTP 451")
    flow.register_feed("binance-spot", lambda: health)

    assert view.refresh()

    row = view.feeds.set_index("feed").loc["binance-spot"]
    assert (row["state"], row["lag_ms_p99"], row["reconnects"], row["last_error"]) == (
        "FAILED", 80.0, 3, "HTTP 451")
    assert view._feeds.data["state_color"][0] == DOWN_COLOR


# -- live updates ------------------------------------------------------------------------------


def test_refresh_does_nothing_when_nothing_changed(view: QualityView) -> None:
    events = record_events(view)

    assert view.refresh() is False
    assert events == []


def test_new_bad_ticks_patch_scores_and_stream_history(view: QualityView, flow: Flow) -> None:
    view.state.symbol = "DDD"
    figure, rows = view.history_figure, len(view.history["time"])
    events = record_events(view)
    at = T0 + MINUTES * 60 * NS  # a new minute
    flow.push(TradeBatch.from_columns(flow.table, time=[at, at + NS], symbol=["DDD", "DDD"],
                                      price=[-5.0, 101.0], size=[1.0, 1.0],
                                      trade_id=[20_000, 20_001]))

    assert view.refresh()

    assert view.history_figure is figure and len(view.history["time"]) == rows + 1
    assert view.history["rejected"][-1] < 100
    assert ("ColumnsStreamedEvent", "quality_history") in events
    assert ("ColumnDataChangedEvent", "quality_history") not in events  # not replaced
    assert view.scores["symbol"].iloc[0] == "DDD"  # now the worst
    assert view.quarantine["symbol"].iloc[0] == "DDD"  # the quarantine followed its count
    latest = latest_scores(flow.quality("1m"))
    pd.testing.assert_frame_equal(view.scores, latest, check_dtype=False)


# -- a FrameSource (no flow) -------------------------------------------------------------------


def test_frame_source_quality_falls_where_bars_have_no_trades() -> None:
    source = FrameSource.synthetic(["AAA", "BBB", "CCC"], n_bars=20)
    view = QualityView(AppState.from_source(source), source)
    assert set(view.scores["score"]) == {100.0}

    last = source.bars("1m", "BBB", n=1)
    source.upsert("1m", "BBB", last.assign(volume=0.0, trades=0))
    source.quarantine("BBB", "bad_time", raw="t=??")
    view.refresh()

    assert view.scores.iloc[0][["symbol", "staleness", "score"]].tolist() == ["BBB", 0.0, 50.0]
    assert view.quarantine["reason"].tolist() == ["bad_time"]
    assert view.feeds["score"].iloc[0] < 100  # one of three symbols stale: the feed's too
    assert view.feeds["feed"].iloc[0] == "synthetic"


def test_frame_source_without_bars_renders_empty_tables() -> None:
    source = FrameSource({}, symbols=["NEW"])
    view = QualityView(AppState.from_source(source), source)

    assert view.scores.empty and len(view.history["time"]) == 0 and view.quarantine.empty
    assert "No quality scores yet" in view._summary.object
    assert view.history_figure.title.text.endswith("no quality rows yet")


def test_a_changed_score_is_patched_in_place(view: QualityView, flow: Flow) -> None:
    order = view.scores["symbol"].tolist()
    before = view.scores.set_index("symbol").loc["BBB", "score"]
    events = record_events(view)
    at = T0 + (MINUTES - 1) * 60 * NS + 30 * NS  # the same, latest minute
    flow.push(TradeBatch.from_columns(flow.table, time=[at, at], symbol=["BBB", "BBB"],
                                      price=[100.0, 101.0], size=[1.0, 1.0],
                                      trade_id=[1, 30_000]))  # one more duplicate

    assert view.refresh()

    assert view.scores["symbol"].tolist() == order  # still worst first
    assert view.scores.set_index("symbol").loc["BBB", "score"] < before
    assert ("ColumnsPatchedEvent", "quality_scores") in events
    assert ("ColumnDataChangedEvent", "quality_scores") not in events
