"""The alerts page without a browser: adding and removing rules through its widgets, bad rules,
fired alerts arriving live from a real flow, and a click on one opening its candles."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bokeh.document import Document

from dashboards.alerts import AlertsView
from dashboards.source import FrameSource
from dashboards.state import AppState
from flows.pipeline import Flow, FlowConfig
from flows.schema import NS, TradeBatch

T0 = 1_700_000_040 * NS  # a minute boundary


def rising_trades(flow: Flow, symbol: str, minutes: int = 10) -> TradeBatch:
    """``symbol`` trades every 5 s from 100.00, one cent higher each trade."""
    n = minutes * 12
    return TradeBatch.from_columns(flow.table, time=T0 + np.arange(n) * 5 * NS,
                                   symbol=[symbol] * n, price=100 + np.arange(n) * 0.01,
                                   size=np.ones(n), trade_id=np.arange(n))


@pytest.fixture
def flow() -> Flow:
    flow = Flow(FlowConfig(store=None, timeframes=("1m", "5m")), clock=lambda: T0 + 3600 * NS)
    flow.push(rising_trades(flow, "AAA"))
    return flow


@pytest.fixture
def view(flow: Flow) -> AlertsView:
    return AlertsView(AppState.from_source(flow), flow)


def type_rule(view: AlertsView, text: str) -> None:
    """Type ``text`` into the rule box and press the Add button, as a user does."""
    view._rule_input.value_input = text
    view._add_button.clicks += 1


# -- rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["* rsi_14 >> 70", "AAA close > 10 on 7m", "hello", ""])
def test_a_bad_rule_shows_one_line_and_changes_nothing(view: AlertsView, flow: Flow,
                                                       text: str) -> None:
    type_rule(view, "* rsi_14 > 70 on 5m")
    before, shown = flow.alert_rules(), view.rules.copy()

    type_rule(view, text)

    assert view.error.startswith("bad alert rule") and "\n" not in view.error
    assert "Traceback" not in view.error
    assert view._error_pane.visible and "bad alert rule" in view._error_pane.object
    assert flow.alert_rules() == before
    assert view.rules.equals(shown)
    assert view._rule_input.value_input == text  # kept, to be corrected


def test_adding_rules_updates_the_table_and_the_flow(view: AlertsView, flow: Flow) -> None:
    type_rule(view, "* rsi_14 > 70 on 5m cooldown 15m")
    view._rule_input.value_input = "AAA close crosses_above 101 on 1m"
    view._rule_input.enter_pressed = True  # Enter in the box adds too

    rules = flow.alert_rules()
    assert [r["text"] for r in rules] == ["* rsi_14 > 70 on 5m cooldown 15m",
                                          "AAA close crosses_above 101 on 1m"]
    assert view.rules.to_dict("records") == [
        {k: r[k] for k in ("id", "text", "kind", "tf")} for r in rules]
    assert view.rules["kind"].tolist() == ["threshold", "cross"]
    assert view.error == "" and not view._error_pane.visible
    assert view._rule_input.value_input == ""  # cleared for the next one


def test_a_bad_rule_then_a_good_one_clears_the_error(view: AlertsView) -> None:
    type_rule(view, "* rsi_14 >> 70")
    assert view._error_pane.visible

    type_rule(view, "* rsi_14 > 70")

    assert view.error == "" and not view._error_pane.visible
    assert view.rules["text"].tolist() == ["* rsi_14 > 70 on 1m"]


def test_remove_acts_on_the_selected_row(view: AlertsView, flow: Flow) -> None:
    for text in ("* rsi_14 > 70 on 5m", "* rsi_14 < 30 on 5m", "AAA close > 101 on 1m"):
        type_rule(view, text)
    target = view.rules["id"].iloc[1]

    view._rules.selected.indices = [1]  # a tapped table row
    view._remove_button.clicks += 1

    assert target not in [r["id"] for r in flow.alert_rules()] and len(flow.alert_rules()) == 2
    assert view.rules["id"].tolist() == [r["id"] for r in flow.alert_rules()]
    assert view._rules.selected.indices == []


def test_remove_without_a_selection_says_so(view: AlertsView, flow: Flow) -> None:
    type_rule(view, "* rsi_14 > 70 on 5m")

    view._remove_button.clicks += 1

    assert len(flow.alert_rules()) == 1 and "Select a rule" in view.error


def test_rules_changed_by_another_session_appear_on_refresh(view: AlertsView,
                                                            flow: Flow) -> None:
    flow.add_alert_rule("* close > 200 on 1m")

    assert view.refresh()

    assert view.rules["text"].tolist() == ["* close > 200 on 1m"]
    assert view.refresh() is False  # nothing new


# -- fired alerts ------------------------------------------------------------------------------


def test_fired_alerts_appear_after_a_refresh(tmp_path: Path) -> None:
    # A flow evaluates its rules when it flushes, which needs a store.
    flow = Flow(FlowConfig(store=str(tmp_path / "market.zarr"), timeframes=("1m", "5m")),
                clock=lambda: T0 + 3600 * NS)
    try:
        view = AlertsView(AppState.from_source(flow), flow)
        type_rule(view, "AAA close crosses_above 100.3 on 1m")
        events: list[str] = []
        doc = Document()
        doc.add_root(view._layout.get_root(doc))
        doc.on_change(lambda e: events.append(getattr(e.model, "name", "")))
        flow.push(rising_trades(flow, "AAA"))
        flow.flush()
        fired = flow.fired_alerts()
        assert len(fired) == 1  # the arrangement fires exactly one alert

        assert view.refresh()

        shown = view.fired.iloc[0]
        assert (shown["symbol"], shown["tf"], shown["rule"]) == (
            "AAA", "1m", "AAA close crosses_above 100.3 on 1m")
        assert shown["value"] == pytest.approx(fired["value"].iloc[0]) and shown["value"] > 100.3
        assert shown["threshold"] == 100.3 and shown["message"] == fired["message"].iloc[0]
        assert shown["time"] == fired["time"].iloc[0].value / 1e6  # Bokeh's ms
        assert "fired_alerts" in events
        assert view.refresh() is False  # nothing new
    finally:
        flow.close()


def test_fired_alerts_are_newest_first_over_a_frame_source() -> None:
    source = FrameSource.synthetic(["AAA", "BBB"], n_bars=10, timeframes=("1m", "5m"))
    view = AlertsView(AppState.from_source(source), source)
    source.add_alert_rule("* close > 10 on 5m")
    source.fire("* close > 10 on 5m", "AAA", "2024-01-02 15:10", 10.2, 10.0)
    source.fire("* close > 10 on 5m", "BBB", "2024-01-02 15:15", 20.4, 10.0)

    assert view.refresh()

    assert view.fired["symbol"].tolist() == ["BBB", "AAA"]
    assert view.fired["value"].tolist() == [20.4, 10.2]
    assert view.rules["text"].tolist() == ["* close > 10 on 5m"]


def test_clicking_a_fired_alert_opens_its_candles() -> None:
    source = FrameSource.synthetic(["AAA", "BBB"], n_bars=10, timeframes=("1m", "5m"))
    view = AlertsView(AppState.from_source(source, page="alerts"), source)
    source.fire("BBB close > 10 on 5m", "BBB", "2024-01-02 15:15", 20.4, 10.0)
    view.refresh()

    view._fired.selected.indices = [0]  # a tapped row

    state = view.state
    assert (state.symbol, state.timeframe, state.page) == ("BBB", "5m", "candles")
    assert view._fired.selected.indices == []  # the same row can be clicked again
