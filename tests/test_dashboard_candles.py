"""The candles page's indicators, forming bar and alerts without a browser: the columns the chart
would draw equal what the source serves, live ticks patch and stream them, toggles show and hide
exactly their renderers, and fired alerts become markers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import panel as pn
import pytest
from test_dashboard import bar, record_data_events

from dashboards.candles import (
    FORMING_ALPHA,
    INDICATOR_COLUMNS,
    LINE_COLUMNS,
    OVERLAYS,
    PANES,
    CandlesView,
)
from dashboards.source import BAR_COLUMNS, FrameSource
from dashboards.state import AppState
from flows.pipeline import Flow, FlowConfig
from flows.schema import NS, TradeBatch

LOOKBACK = 60
T0 = pd.Timestamp("2024-01-02 09:30").value


@pytest.fixture
def source() -> FrameSource:
    # 300 bars, so SMA 200 has values on all 60 bars shown.
    return FrameSource.synthetic(["AAA", "BBB"], n_bars=300)


@pytest.fixture
def view(source: FrameSource) -> CandlesView:
    return CandlesView(AppState.from_source(source, lookback=LOOKBACK), source)


def assert_shows(view: CandlesView, source, tf: str, symbol: str) -> None:
    """The chart holds the last ``lookback`` bars and, on the same rows, the source's
    indicators and provisional flags."""
    bars = source.bars(tf, symbol, n=view.state.lookback)
    indicators = source.symbol_indicators(tf, symbol, n=view.state.lookback)
    np.testing.assert_array_equal(view.data["time"], bars.index.values)
    np.testing.assert_array_equal(indicators.index.values, bars.index.values)
    for name in BAR_COLUMNS:
        np.testing.assert_array_equal(view.data[name], bars[name].to_numpy(), err_msg=name)
    for name in INDICATOR_COLUMNS:
        np.testing.assert_array_equal(view.data[name], indicators[name].to_numpy(), err_msg=name)
    np.testing.assert_array_equal(view.data["provisional"], indicators["provisional"].to_numpy())


def push_trades(flow: Flow, symbol: str, start_s: float, n: int, price: float,
                step: float = 0.01, every_s: float = 5.0) -> None:
    times = T0 + (start_s + np.arange(n) * every_s) * NS
    flow.push(TradeBatch.from_columns(flow.table, time=times.astype(np.int64),
                                      symbol=[symbol] * n, price=price + np.arange(n) * step,
                                      size=np.ones(n)))


# -- indicators equal the source's ------------------------------------------------------------


@pytest.mark.parametrize(("symbol", "tf"), [("AAA", "1m"), ("BBB", "5m")])
def test_indicator_columns_equal_the_frame_source(view: CandlesView, source: FrameSource,
                                                  symbol: str, tf: str) -> None:
    view.state.param.update(symbol=symbol, timeframe=tf)

    assert_shows(view, source, tf, symbol)
    assert np.isfinite(view.data["sma_200"]).all()  # every shown row has one


def test_indicator_columns_follow_a_flow_fed_with_trades() -> None:
    # Arrange: a flow in memory, 80 minutes of trades (12 a minute) for two symbols.
    flow = Flow(FlowConfig(store=None, timeframes=("1m", "5m")))
    push_trades(flow, "AAA", 0, 960, 100.0, step=0.003)
    push_trades(flow, "BBB", 0, 960, 50.0, step=-0.002)
    view = CandlesView(AppState.from_source(flow, lookback=LOOKBACK), flow)
    assert_shows(view, flow, "1m", "AAA")
    assert view.data["provisional"][-1] and not view.data["provisional"][:-1].any()
    events = record_data_events(view)

    # Act: a trade in the forming minute, then one opening the next minute.
    push_trades(flow, "AAA", 4795, 1, 105.0)
    assert view.refresh()
    patched = list(events)
    push_trades(flow, "AAA", 4800, 1, 104.0)
    assert view.refresh()

    # Assert: the forming row was patched, the new bar streamed; all equal the flow's.
    assert patched == ["ColumnsPatchedEvent"]
    assert events == ["ColumnsPatchedEvent", "ColumnsPatchedEvent", "ColumnsStreamedEvent"]
    assert len(view.data["time"]) == LOOKBACK
    assert_shows(view, flow, "1m", "AAA")
    view.state.timeframe = "5m"
    assert_shows(view, flow, "5m", "AAA")


# -- live ticks -------------------------------------------------------------------------------


def test_tick_patches_the_forming_row_then_a_new_bar_streams(view: CandlesView,
                                                             source: FrameSource) -> None:
    data, last = view.data, source.bars("1m", "AAA", n=1)
    events = record_data_events(view)

    source.upsert("1m", "AAA", bar(last.index[-1], float(last["open"].iloc[0]), 123.0))
    assert view.refresh()
    assert events == ["ColumnsPatchedEvent"] and view.data is data
    assert view.data["close"][-1] == 123.0
    assert view.data["sma_20"][-1] == source.symbol_indicators("1m", "AAA")["sma_20"].iloc[-1]
    assert_shows(view, source, "1m", "AAA")

    source.upsert("1m", "AAA", bar(last.index[-1] + pd.Timedelta("1min"), 123.0, 124.0))
    assert view.refresh()
    assert events[1:] == ["ColumnsPatchedEvent", "ColumnsStreamedEvent"] and view.data is data
    assert len(view.data["time"]) == LOOKBACK  # rollover keeps lookback rows
    assert_shows(view, source, "1m", "AAA")


def test_a_tick_without_changes_sends_nothing(view: CandlesView, source: FrameSource) -> None:
    events = record_data_events(view)
    last = source.bars("1m", "AAA", n=1)

    source.upsert("1m", "AAA", last)  # a new version, the same values
    view.refresh()

    assert events == []


def test_ticks_wait_for_a_served_page_to_load(view: CandlesView, source: FrameSource,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    last = source.bars("1m", "AAA", n=1)
    source.upsert("1m", "AAA", bar(last.index[-1] + pd.Timedelta("1min"), 50.0, 51.0))
    events = record_data_events(view)
    state = type(pn.state)
    monkeypatch.setattr(state, "curdoc", property(
        lambda self: SimpleNamespace(session_context=object())))
    monkeypatch.setattr(state, "loaded", property(lambda self: False))

    view._tick()  # a served page not loaded yet: nothing read, nothing sent
    assert events == [] and view._seen_version != source.version()

    monkeypatch.undo()
    view._tick()  # the first tick after catches up
    assert "ColumnsStreamedEvent" in events
    assert_shows(view, source, "1m", "AAA")


# -- the forming bar --------------------------------------------------------------------------


def test_forming_row_is_flagged_and_styled(view: CandlesView, source: FrameSource) -> None:
    data, forming = view.data, view.forming

    assert data["provisional"][-1] and not data["provisional"][:-1].any()
    assert data["fill_alpha"][-1] == FORMING_ALPHA and set(data["fill_alpha"][:-1]) == {1.0}
    assert data["line_dash"][-1] == "dashed" and set(data["line_dash"][:-1]) == {"solid"}
    assert data["phase"][-1] == "forming" and set(data["phase"][:-1]) == {""}
    # The dashed last segments run from the last closed bar to the forming one.
    np.testing.assert_array_equal(forming["time"], data["time"][-2:])
    for name in LINE_COLUMNS:
        np.testing.assert_array_equal(forming[name], data[name][-2:], err_msg=name)
    bodies = view.price_figure.select_one({"name": "bodies"}).glyph
    assert (bodies.fill_alpha, bodies.line_dash) == ("fill_alpha", "line_dash")
    dashed = view.price_figure.select_one({"name": "candles_sma_20_forming"})
    assert dashed.data_source is view._forming and dashed.glyph.line_dash == [6]
    solid = view.price_figure.select_one({"name": "candles_sma_20"})
    assert solid.glyph.y["transform"] is not None  # stops at the last closed bar
    assert "forming bar (dashed)" in [item.label["value"] for item in
                                      view.price_figure.legend[0].items]


def test_a_new_bar_moves_the_forming_style(view: CandlesView, source: FrameSource) -> None:
    last = source.bars("1m", "AAA", n=1).index[-1]

    source.upsert("1m", "AAA", bar(last + pd.Timedelta("1min"), 50.0, 51.0))
    view.refresh()

    assert view.data["provisional"][-1] and not view.data["provisional"][-2]
    assert list(view.data["line_dash"][-2:]) == ["solid", "dashed"]
    np.testing.assert_array_equal(view.forming["time"], view.data["time"][-2:])


def test_without_a_forming_bar_no_segment_is_dashed(view: CandlesView,
                                                    source: FrameSource,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    closed = source.symbol_indicators("1m", "AAA").assign(provisional=False)
    monkeypatch.setattr(source, "symbol_indicators", lambda tf, symbol, n=None: closed)

    view.reload()

    assert not view.data["provisional"].any() and len(view.forming["time"]) == 0


# -- toggles ----------------------------------------------------------------------------------


def visibility(view: CandlesView) -> dict[str, bool]:
    figures = [view.price_figure, view.volume_figure, *view.pane_figures.values()]
    return {r.id: r.visible for f in figures for r in f.renderers}


def test_default_overlays_and_panes(view: CandlesView) -> None:
    shown = {k for k, rs in view.overlay_renderers.items() if all(r.visible for r in rs)}
    hidden = {k for k, rs in view.overlay_renderers.items() if not any(r.visible for r in rs)}

    assert shown == {"sma_20", "sma_50"} and hidden == set(OVERLAYS) - shown
    # Only the RSI pane is built: a pane's figure is made the first time it is shown.
    assert list(view.pane_figures) == ["rsi"] and view.pane_figures["rsi"].visible
    assert view._chart.object.children == [view.price_figure, view.volume_figure,
                                           view.pane_figures["rsi"]]


def test_toggling_an_overlay_toggles_exactly_its_renderers(view: CandlesView) -> None:
    figure, chart, before = view.price_figure, view._chart.object, visibility(view)

    view._overlay_input.value = ["sma_20", "sma_50", "bb"]  # the user presses "Bollinger"

    after = visibility(view)
    changed = {rid for rid in after if after[rid] != before[rid]}
    assert changed == {r.id for r in view.overlay_renderers["bb"]}
    assert all(after[r.id] for r in view.overlay_renderers["bb"])
    assert len(view.overlay_renderers["bb"]) == 7  # 3 lines, 3 dashed segments, the band
    assert view.price_figure is figure and view._chart.object is chart

    view._overlay_input.value = ["sma_50", "bb"]

    after_again = visibility(view)
    assert {rid for rid in after_again if after_again[rid] != after[rid]} == {
        r.id for r in view.overlay_renderers["sma_20"]}
    assert not view._legend_items["sma_20"].visible and view._legend_items["bb"].visible


def test_hover_lists_the_indicators_shown(view: CandlesView) -> None:
    labels = [label for label, _ in view._hover.tooltips]
    assert labels[:6] == ["time", "open", "high", "low", "close", "volume"]
    assert {"SMA 20", "SMA 50", "RSI 14"} <= set(labels) and "EMA 12" not in labels
    assert ("close", "@close{custom}") in view._hover.tooltips  # trader price decimals
    assert view._hover.formatters["@close"] is view._hover.formatters["@sma_20"]

    view.param.update(overlays=["ema_12"], panes=["macd"])

    labels = [label for label, _ in view._hover.tooltips]
    assert {"EMA 12", "MACD", "signal", "histogram"} <= set(labels)
    assert not {"SMA 20", "RSI 14"} & set(labels)


def test_toggling_panes_shows_them_with_the_time_axis_under_the_last(view: CandlesView) -> None:
    chart, rsi = view._chart.object, view.pane_figures["rsi"]

    view._pane_input.value = ["atr", "macd"]  # the user presses "MACD", then "ATR 14"

    assert {k for k, f in view.pane_figures.items() if f.visible} == {"macd", "atr"}
    assert chart.children == [view.price_figure, view.volume_figure, rsi,
                              view.pane_figures["macd"], view.pane_figures["atr"]]
    axes = {k: f.xaxis[0].visible for k, f in view.pane_figures.items()}
    assert axes == {"rsi": False, "macd": False, "atr": True}
    assert not view.volume_figure.xaxis[0].visible and view._chart.object is chart
    for figure in view.pane_figures.values():
        assert figure.x_range is view.price_figure.x_range
    low, high = view.pane_figures["atr"].y_range.start, view.pane_figures["atr"].y_range.end
    assert low < np.nanmin(view.data["atr_14"]) < np.nanmax(view.data["atr_14"]) < high

    view._pane_input.value = ["rsi"]

    assert view.pane_figures["rsi"] is rsi and rsi.visible  # shown again, not rebuilt
    assert not view.pane_figures["macd"].visible and rsi.xaxis[0].visible
    view._pane_input.value = []
    assert view.volume_figure.xaxis[0].visible


def test_panes_draw_their_guides_and_macd_bars(view: CandlesView) -> None:
    from bokeh.models import Span

    view.panes = list(PANES)

    def guides(key: str) -> list[float]:
        return sorted(s.location for s in view.pane_figures[key].center
                      if isinstance(s, Span) and s.dimension == "width")

    assert guides("rsi") == [30, 70] and guides("stoch") == [20, 80]
    rsi = view.pane_figures["rsi"].y_range
    assert (rsi.start, rsi.end) == (0, 100)
    hist = view.pane_figures["macd"].select_one({"name": "candles_macd_hist"})
    up = view.data["macd_hist"] >= 0
    np.testing.assert_array_equal(view.data["hist_color"] == "#26a69a", up)
    assert hist.glyph.fill_color == "hist_color" and hist.glyph.fill_alpha == "fill_alpha"
    assert set(PANES) == set(view.pane_figures)


# -- alerts -----------------------------------------------------------------------------------


def test_an_alert_for_the_symbol_is_one_marker_at_its_bar(view: CandlesView,
                                                          source: FrameSource) -> None:
    times = source.bars("1m", "AAA", n=10).index
    source.fire("AAA close crosses_above 10 on 1m", "AAA", times[3], 10.1, 10.0)
    source.fire("BBB close crosses_below 10 on 1m", "BBB", times[5], 9.9, 10.0)
    source.fire("AAA close > 10 on 5m", "AAA", times[5], 10.1, 10.0)

    assert view.refresh()  # a new alert is news even when no bar changed

    marks = view.alerts
    np.testing.assert_array_equal(marks["time"], [times[3].to_datetime64()])
    row = int(np.searchsorted(view.data["time"], times[3].to_datetime64()))
    assert marks["marker"][0] == "triangle" and marks["y"][0] < view.data["low"][row]
    assert marks["rule"][0] == "AAA close crosses_above 10 on 1m"
    assert marks["message"][0].startswith("AAA close 10.1")

    view.state.symbol = "BBB"

    np.testing.assert_array_equal(view.alerts["time"], [times[5].to_datetime64()])
    assert view.alerts["marker"][0] == "inverted_triangle"
    row = int(np.searchsorted(view.data["time"], times[5].to_datetime64()))
    assert view.alerts["y"][0] > view.data["high"][row]


def test_markers_follow_new_alerts_and_only_reread_them_on_news(
        view: CandlesView, source: FrameSource, monkeypatch: pytest.MonkeyPatch) -> None:
    times = source.bars("1m", "AAA", n=5).index
    calls: list[int] = []
    fired_alerts = source.fired_alerts
    monkeypatch.setattr(source, "fired_alerts", lambda n=500: calls.append(n) or fired_alerts(n))

    assert not view.refresh() and calls == [1]  # nothing new: only the newest is read
    source.fire("AAA rsi_14 > 70 on 1m", "AAA", times[1], 71.0, 70.0)
    assert view.refresh() and calls[1:] == [1, 500]
    source.fire("AAA rsi_14 < 30 on 1m", "AAA", times[2], 29.0, 30.0)
    assert view.refresh()

    assert sorted(view.alerts["marker"]) == ["inverted_triangle", "triangle"]
    assert len(view.alerts["time"]) == 2


def test_alerts_older_than_the_window_are_not_marked(view: CandlesView,
                                                     source: FrameSource) -> None:
    old = source.bars("1m", "AAA").index[0]
    source.fire("AAA close crosses_above 10 on 1m", "AAA", old, 10.1, 10.0)

    view.refresh()

    assert len(view.alerts["time"]) == 0


def test_an_alert_fired_by_a_flow_is_marked(tmp_path: Path) -> None:
    flow = Flow(FlowConfig(store=str(tmp_path / "market.zarr"), timeframes=("1m", "5m")))
    try:
        flow.add_alert_rule("AAA close crosses_above 100.3 on 1m")
        push_trades(flow, "AAA", 0, 120, 100.0)
        push_trades(flow, "BBB", 0, 120, 100.0)
        view = CandlesView(AppState.from_source(flow, lookback=LOOKBACK), flow)
        assert len(view.alerts["time"]) == 0

        flow.flush()  # alert rules are evaluated as the flow flushes
        fired = flow.fired_alerts()
        view.refresh()

        assert list(fired["symbol"]) == ["AAA"]
        np.testing.assert_array_equal(view.alerts["time"], fired["time"].to_numpy())
        view.state.symbol = "BBB"
        assert len(view.alerts["time"]) == 0
    finally:
        flow.close()


def test_a_source_without_indicators_or_alerts_still_draws_bars(source: FrameSource) -> None:
    class BarsOnly:
        """Only the BarSource protocol."""

        def __getattr__(self, name: str):
            if name in ("symbol_indicators", "fired_alerts"):
                raise AttributeError(name)
            return getattr(source, name)

    view = CandlesView(AppState.from_source(source, lookback=LOOKBACK), BarsOnly())

    assert len(view.data["close"]) == LOOKBACK and np.isnan(view.data["sma_20"]).all()
    assert not view.data["provisional"].any() and len(view.alerts["time"]) == 0
    assert not view.refresh()
