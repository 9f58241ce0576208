"""The candles view without a browser: what it would draw, and how live updates reach it."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import panel as pn
import pytest
from bokeh.document import Document

import dashboards.source
from dashboards.app import create_app
from dashboards.candles import (
    DOWN_COLOR,
    UP_COLOR,
    CandlesView,
    format_change,
    format_price,
)
from dashboards.source import BAR_COLUMNS, BarSource, FrameSource
from dashboards.state import AppState
from flows.schema import TIMEFRAMES


@pytest.fixture
def source() -> FrameSource:
    return FrameSource.synthetic(["AAA", "BBB", "CCC"], n_bars=60, empty=["NEW"])


@pytest.fixture
def view(source: FrameSource) -> CandlesView:
    return CandlesView(AppState.from_source(source, lookback=40), source)


def bar(time: pd.Timestamp, open_: float, close: float, volume: float = 10.0) -> pd.DataFrame:
    """One bar row with a ``time`` index, as a flow would upsert it."""
    return pd.DataFrame(
        {"open": open_, "high": max(open_, close) + 0.5, "low": min(open_, close) - 0.5,
         "close": close, "volume": volume, "trades": 3, "vwap": (open_ + close) / 2},
        index=pd.DatetimeIndex([time], name="time"))


def record_data_events(view: CandlesView) -> list[str]:
    """Return a list that collects the names of the data events the chart would send."""
    events: list[str] = []
    doc = Document()
    doc.add_root(view._chart.object)
    doc.on_change(lambda event: events.append(type(event).__name__)
                  if getattr(event, "model", None) is view._cds else None)
    return events


def assert_shows(view: CandlesView, expected: pd.DataFrame) -> None:
    np.testing.assert_array_equal(view.data["time"], expected.index.values)
    for name in BAR_COLUMNS:
        np.testing.assert_array_equal(view.data[name], expected[name].to_numpy(), err_msg=name)
    up = expected["close"].to_numpy() >= expected["open"].to_numpy()
    np.testing.assert_array_equal(view.data["color"], np.where(up, UP_COLOR, DOWN_COLOR))


def test_frame_source_is_a_bar_source(source: FrameSource) -> None:
    assert isinstance(source, BarSource)
    bars = source.bars("1m", "AAA", n=5)
    assert bars.index.name == "time" and bars.index.dtype == "datetime64[ns]"
    assert list(bars.columns) == list(BAR_COLUMNS)
    assert bars["trades"].dtype == "int64" and bars["close"].dtype == "float64"
    assert source.bars("1m", "NEW").empty and source.bars("1m", "UNKNOWN").empty
    assert set(source.status()) >= {"feed", "state", "received", "accepted", "quarantined",
                                    "duplicates"}


@pytest.mark.parametrize(("symbol", "tf"), [("AAA", "1m"), ("BBB", "5m"), ("CCC", "1m")])
def test_state_selects_the_data_drawn(view: CandlesView, source: FrameSource, symbol: str,
                                      tf: str) -> None:
    view.state.param.update(symbol=symbol, timeframe=tf)

    assert_shows(view, source.bars(tf, symbol, n=40))
    assert view.price_figure.title.text == f"{symbol} · {tf}"
    assert view._bar_glyphs[0].width == pytest.approx(0.8 * TIMEFRAMES[tf] / 1e6)


def test_forming_bar_is_patched_in_place(view: CandlesView, source: FrameSource) -> None:
    figure, x_range, data = view.price_figure, view.price_figure.x_range, view.data
    last = source.bars("1m", "AAA", n=1)
    events = record_data_events(view)

    source.upsert("1m", "AAA", bar(last.index[-1], float(last["open"].iloc[0]), 123.0))
    changed = view.refresh()

    assert changed and events == ["ColumnsPatchedEvent"]
    assert view.price_figure is figure and figure.x_range is x_range and view.data is data
    assert len(view.data["close"]) == 40 and view.data["close"][-1] == 123.0
    assert_shows(view, source.bars("1m", "AAA", n=40))


def test_new_bar_is_streamed_and_followed(view: CandlesView, source: FrameSource) -> None:
    x_range, step = view.price_figure.x_range, TIMEFRAMES["1m"] / 1e6
    start, end = x_range.start, x_range.end
    last = source.bars("1m", "AAA", n=1).index[-1]

    events = record_data_events(view)

    source.upsert("1m", "AAA", bar(last + pd.Timedelta("1min"), 50.0, 51.0))
    assert view.refresh()

    # The bar that was forming is patched as closed, the new one streamed.
    assert events == ["ColumnsPatchedEvent", "ColumnsStreamedEvent"]
    assert view.price_figure.x_range is x_range
    assert len(view.data["close"]) == 40  # rollover keeps lookback bars
    assert_shows(view, source.bars("1m", "AAA", n=40))
    assert (x_range.start, x_range.end) == (start + step, end + step)
    assert (x_range.reset_start, x_range.reset_end) == (x_range.start, x_range.end)


def test_many_new_bars_at_once_are_all_streamed(view: CandlesView, source: FrameSource) -> None:
    last = source.bars("1m", "AAA", n=1).index[-1]
    for i in range(1, 11):
        source.upsert("1m", "AAA", bar(last + pd.Timedelta(minutes=i), 50.0 + i, 51.0 + i))

    view.refresh()

    assert_shows(view, source.bars("1m", "AAA", n=40))


def test_user_zoom_survives_updates(view: CandlesView, source: FrameSource) -> None:
    x_range = view.price_figure.x_range
    t = view.data["time"].astype("int64") / 1e6
    x_range.update(start=t[5], end=t[20])  # what the browser syncs after a pan or wheel zoom
    assert not view.following

    for i in range(1, 3):
        last = source.bars("1m", "AAA", n=1).index[-1]
        source.upsert("1m", "AAA", bar(last, 40.0, 40.0 + i))
        source.upsert("1m", "AAA", bar(last + pd.Timedelta("1min"), 41.0, 42.0))
        assert view.refresh()

    assert (x_range.start, x_range.end) == (t[5], t[20])


def test_refresh_does_nothing_without_a_new_version(view: CandlesView) -> None:
    assert not view.refresh()


def test_switching_symbol_replaces_data_and_resets_ranges(view: CandlesView,
                                                          source: FrameSource) -> None:
    view.price_figure.x_range.update(start=0, end=1)

    view.state.symbol = "BBB"

    assert_shows(view, source.bars("1m", "BBB", n=40))
    assert view.following and view.price_figure.x_range.end > 1
    low, high = view.price_figure.y_range.start, view.price_figure.y_range.end
    assert low < source.bars("1m", "BBB", n=40)["low"].min() < high


def test_pickers_set_the_state(view: CandlesView, source: FrameSource) -> None:
    view._symbol_input.value = "CCC"
    view._tf_input.value = "5m"

    assert (view.state.symbol, view.state.timeframe) == ("CCC", "5m")
    assert_shows(view, source.bars("5m", "CCC", n=40))
    assert view._symbol_input.search_strategy == "includes" and view._symbol_input.restrict


def test_symbol_without_bars_shows_a_message(view: CandlesView, source: FrameSource) -> None:
    view.state.symbol = "NEW"

    assert len(view.data["close"]) == 0 and view.last_price is None
    assert view._message.visible and "No bars yet" in view._message.object

    source.upsert("1m", "NEW", bar(pd.Timestamp("2024-01-02 16:00"), 5.0, 6.0))
    assert view.refresh()

    assert_shows(view, source.bars("1m", "NEW"))
    assert not view._message.visible and view.last_price == 6.0


def test_last_price_and_change_against_previous_close(view: CandlesView,
                                                      source: FrameSource) -> None:
    bars = source.bars("1m", "AAA")
    last, previous = bars["close"].iloc[-1], bars["close"].iloc[-2]

    assert view.last_price == last
    assert view.change == pytest.approx(last - previous)
    assert view.change_pct == pytest.approx((last - previous) / previous)
    assert format_change(view.change, view.change_pct, view.last_price) in view._price_pane.object


def test_single_bar_change_is_against_its_open(view: CandlesView, source: FrameSource) -> None:
    source.upsert("1m", "NEW", bar(pd.Timestamp("2024-01-02 16:00"), 8.0, 6.0))

    view.state.symbol = "NEW"

    assert (view.last_price, view.change, view.change_pct) == (6.0, -2.0, -0.25)
    assert "−2.00 (−25.00%)" in view._price_pane.object


def test_formats() -> None:
    assert format_price(101234.5) == "101,234.50"
    assert format_price(0.000123456) == "0.0001235"
    assert format_change(0.0, 0.0, 10.0) == "0.00 (0.00%)"


def test_one_periodic_callback_per_view(view: CandlesView) -> None:
    pn.panel(view)
    pn.panel(view)
    callback = view._callback

    assert callback is not None and callback.period == 1000
    view.stop()
    assert view._callback is None and not callback.running


def test_renders_inline_and_as_an_app(view: CandlesView, source: FrameSource) -> None:
    pn.extension()
    bundle = pn.panel(view)._repr_mimebundle_()
    assert any("html" in kind or "panel" in kind for kind in bundle[0])
    model = create_app(source).get_root()
    assert model is not None
    view.stop()


def test_default_source_falls_back_to_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboards.source, "_default", None)
    monkeypatch.setitem(sys.modules, "flows.pipeline", None)  # as if the module did not exist

    first = dashboards.source.default_source()

    assert isinstance(first, FrameSource) and dashboards.source.default_source() is first
