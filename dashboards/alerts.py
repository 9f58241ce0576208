"""The alerts page: the alert rules, adding and removing them, and the alerts that fired.

- **Rules**: each rule's id, one-line text, kind and timeframe; select a row and press
  *Remove* to delete that rule.
- **Add rule**: type a rule's one-line text (see :class:`flows.alerts.Rule`; the syntax and
  examples are shown under the box) and press *Add rule* or Enter. A bad rule shows its
  one-line reason and changes nothing.
- **Fired alerts**: the latest alerts, newest first: when each fired, its bar, symbol,
  timeframe, rule, value, threshold and message. Clicking one opens its symbol's candles on
  its timeframe.

A flow fires alerts when it flushes, not on every bar change, so each tick reads the newest
fired alert (one row) and the rules (other sessions share the source and may change them),
and re-reads the fired table only when the newest alert changed.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    DateFormatter,
    NumberFormatter,
    TableColumn,
)

from dashboards.candles import DOWN_COLOR
from dashboards.live import PeriodicRefresh
from dashboards.quality import on_row_tap, sync_table
from dashboards.source import ALERT_COLUMNS, MarketSource
from dashboards.state import AppState

#: Fired alerts shown (newest first).
FIRED_ROWS = 500
#: Example rules shown under the input box.
EXAMPLES: tuple[str, ...] = (
    "* rsi_14 > 70 on 5m cooldown 15m",
    "BTCUSDT close crosses_above 50000 on 1m",
    "* pct_change 5m > 2",
    "* volume > 3x volume_sma_20 on 1m",
    "* quality < 80 on 1m once",
)

_RULE_FIELDS = ("id", "text", "kind", "tf")
_FIRED_FIELDS = ("fired_at", "time", "symbol", "tf", "rule", "value", "threshold", "message")

_HINT = (
    "<div class='tf-muted' style='font-size:0.85em;line-height:1.6'>"
    "<code>SYMBOL FIELD OP VALUE [on TF] [cooldown D] [once] [forming]</code><br>"
    "<code>SYMBOL [FIELD] pct_change WINDOW OP NUMBER [on TF]</code><br>"
    "SYMBOL or <code>*</code> (every symbol) · FIELD a bar field, an indicator "
    "(<code>rsi_14</code>, <code>sma_50</code>, …) or <code>quality</code> · OP "
    + " ".join(f"<code>{html.escape(op)}</code>" for op in
               ("crosses_above", "crosses_below", ">", "<", ">=", "<="))
    + "<br>VALUE a number, a column or <code>3x volume_sma_20</code> · TF 1m (default), 5m, "
    "15m, 1h, 4h, 1d · durations <code>90s</code>, <code>15m</code>, <code>4h</code>"
    "<br>Examples:<br>"
    + "<br>".join(f"<code>{html.escape(e)}</code>" for e in EXAMPLES) + "</div>")


def rule_data(rules: list[dict]) -> dict[str, np.ndarray]:
    """Return the rules table's columns ``id text kind tf`` from :meth:`alert_rules` dicts.

    Examples
    --------
    >>> rule_data([{"id": "ab12", "text": "* close > 1 on 1m", "kind": "threshold",
    ...             "symbol": "*", "tf": "1m"}])["text"].tolist()
    ['* close > 1 on 1m']
    """
    return {k: np.array([str(r.get(k, "")) for r in rules], dtype=object) for k in _RULE_FIELDS}


def fired_data(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return the fired table's columns from :meth:`fired_alerts` (times in ms since the epoch,
    as Bokeh draws them).

    Examples
    --------
    >>> f = pd.DataFrame({"time": pd.to_datetime(["2024-01-02 09:30"]),
    ...                   "fired_at": pd.to_datetime(["2024-01-02 09:31"]), "symbol": ["AAA"],
    ...                   "tf": ["1m"], "rule": ["AAA close > 1 on 1m"], "rule_id": ["ab12"],
    ...                   "kind": ["threshold"], "value": [1.5], "threshold": [1.0],
    ...                   "message": ["AAA close 1.5 > 1"]})
    >>> d = fired_data(f)
    >>> d["symbol"].tolist(), d["time"].tolist(), d["value"].tolist()
    (['AAA'], [1704187800000.0], [1.5])
    """
    data: dict[str, np.ndarray] = {}
    for name in _FIRED_FIELDS:
        column = frame[name]
        if name in ("time", "fired_at"):
            t = column.to_numpy(dtype="datetime64[ns]")
            data[name] = np.where(np.isnat(t), np.nan, t.view(np.int64) / 1e6)
        elif name in ("value", "threshold"):
            data[name] = np.array(column.to_numpy(dtype=float), copy=True)
        else:
            data[name] = np.array(column.astype(str).tolist(), dtype=object)
    return data


def _newest(frame: pd.DataFrame) -> tuple | None:
    """Return what identifies the newest fired alert (None when none fired)."""
    if frame.empty:
        return None
    row = frame.iloc[0]
    return (row["time"], row["fired_at"], row["rule_id"], row["symbol"])


class AlertsView(PeriodicRefresh, pn.viewable.Viewer):
    """The alert rules (add, remove) and the alerts fired, live.

    Parameters
    ----------
    state : AppState
        Clicking a fired alert sets ``symbol``, ``timeframe`` and ``page="candles"``.
    source : MarketSource
        Holds the rules and the fired alerts (shared by all sessions).

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> src = FrameSource.synthetic(["AAA"], n_bars=5)
    >>> view = AlertsView(AppState.from_source(src), src)
    >>> view.add_rule("AAA close > 10 on 1m"), view.rules["text"].tolist()
    (True, ['AAA close > 10 on 1m'])
    >>> view.add_rule("AAA close > 10 on 7m"), view.rules["text"].tolist()
    (False, ['AAA close > 10 on 1m'])
    >>> view.error  # doctest: +ELLIPSIS
    "bad alert rule 'AAA close > 10 on 7m': unknown timeframe '7m' (expected one of 1m, ...)"
    """

    state = param.ClassSelector(class_=AppState, doc="The session's app state.")

    source = param.Parameter(doc="The MarketSource read.")

    draw_on_start = True  # draw at once, then refresh periodically

    period = param.Integer(default=2000, bounds=(50, None), doc="""
        Milliseconds between checks for new alerts and changed rules.""")

    error = param.String(default="", doc="""
        Why the last add or remove failed (one line), empty after a success.""")

    def __init__(self, state: AppState | None = None, source: MarketSource | None = None,
                 **params):
        if source is None:
            raise TypeError("AlertsView needs a source")
        if state is None:
            state = AppState.from_source(source)
        super().__init__(state=state, source=source, **params)
        self._seen_alert: tuple | None = None
        self._callback: pn.io.PeriodicCallback | None = None
        self._build_rules()
        self._build_form()
        self._build_fired()
        self._summary = pn.pane.HTML("", css_classes=["tapeflow-summary"])
        self._layout = pn.Column(
            pn.Row(
                pn.Column(pn.pane.HTML("<b>Rules</b> · select one, then Remove"),
                          self._rules_pane, self._remove_button, width=640),
                pn.Column(pn.pane.HTML("<b>Add a rule</b>"),
                          pn.Row(self._rule_input, self._add_button, sizing_mode="stretch_width"),
                          self._error_pane, pn.pane.HTML(_HINT, sizing_mode="stretch_width"),
                          sizing_mode="stretch_width"),
                sizing_mode="stretch_width"),
            pn.Row(pn.pane.HTML("<b>Fired alerts</b> · newest first; click one for its candles"),
                   self._summary, sizing_mode="stretch_width"),
            self._fired_pane,
            sizing_mode="stretch_width", css_classes=["tapeflow-alerts"],
        )
        self.reload()

    # -- construction -------------------------------------------------------------------------

    def _build_rules(self) -> None:
        self._rules = ColumnDataSource(rule_data([]), name="alert_rules")
        columns = [TableColumn(field="id", title="id", width=100),
                   TableColumn(field="text", title="rule", width=380),
                   TableColumn(field="kind", title="kind", width=90),
                   TableColumn(field="tf", title="tf", width=50)]
        table = DataTable(source=self._rules, columns=columns, index_position=None, height=240,
                          sizing_mode="stretch_width", reorderable=False,
                          name="alert_rules_table")
        self._rules_pane = pn.pane.Bokeh(table, sizing_mode="stretch_width")
        self._remove_button = pn.widgets.Button(label="Remove", color="danger",
                                                variant="outline", width=100,
                                                css_classes=["tapeflow-remove-rule"])
        self._remove_button.on_click(lambda _event: self.remove_selected())

    def _build_form(self) -> None:
        self._rule_input = pn.widgets.TextInput(
            placeholder=EXAMPLES[0], sizing_mode="stretch_width", min_width=300,
            css_classes=["tapeflow-rule-input"])
        self._rule_input.param.watch(lambda _event: self._add_typed(), "enter_pressed")
        self._add_button = pn.widgets.Button(label="Add rule", color="primary", width=100,
                                             css_classes=["tapeflow-add-rule"])
        self._add_button.on_click(lambda _event: self._add_typed())
        self._error_pane = pn.pane.HTML("", visible=False, sizing_mode="stretch_width",
                                        css_classes=["tapeflow-rule-error"])

    def _build_fired(self) -> None:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in ALERT_COLUMNS})
        self._fired = ColumnDataSource(fired_data(empty), name="fired_alerts")
        when = DateFormatter(format="%Y-%m-%d %H:%M:%S", nan_format="—")
        number = NumberFormatter(format="0,0.[0000]", text_align="right", nan_format="—")
        columns = [TableColumn(field="fired_at", title="fired", width=140, formatter=when),
                   TableColumn(field="time", title="bar", width=140, formatter=when),
                   TableColumn(field="symbol", title="symbol", width=80),
                   TableColumn(field="tf", title="tf", width=40),
                   TableColumn(field="rule", title="rule", width=280),
                   TableColumn(field="value", title="value", width=90, formatter=number),
                   TableColumn(field="threshold", title="threshold", width=90,
                               formatter=number),
                   TableColumn(field="message", title="message", width=420)]
        table = DataTable(source=self._fired, columns=columns, index_position=None, height=360,
                          sizing_mode="stretch_width", reorderable=False,
                          name="fired_alerts_table")
        on_row_tap(self._fired, self.open_alert)
        self._fired_pane = pn.pane.Bokeh(table, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        self.start()
        return self._layout

    # -- what is shown ------------------------------------------------------------------------

    @property
    def rules(self) -> pd.DataFrame:
        """The rules table's rows: ``id text kind tf``."""
        return pd.DataFrame({k: self._rules.data[k] for k in _RULE_FIELDS})

    @property
    def fired(self) -> pd.DataFrame:
        """The fired table's rows, newest first (times in ms since the epoch)."""
        return pd.DataFrame({k: self._fired.data[k] for k in _FIRED_FIELDS})

    # -- actions ------------------------------------------------------------------------------

    def add_rule(self, text: str) -> bool:
        """Add the rule ``text`` to the source; on a bad rule show its one-line reason in
        :attr:`error` and change nothing. Return whether the rule was added."""
        try:
            self.source.add_alert_rule(text.strip())
        except ValueError as exc:
            self.error = (str(exc).strip().splitlines() or ["bad alert rule"])[0]
            return False
        self.error = ""
        self._update_rules()
        return True

    def _add_typed(self) -> None:
        if self.add_rule(self._rule_input.value_input or ""):
            self._rule_input.value = self._rule_input.value_input = ""

    def remove_selected(self) -> bool:
        """Remove the rule selected in the rules table; return whether one was removed."""
        indices = self._rules.selected.indices
        ids = self._rules.data["id"]
        if not indices or not 0 <= indices[0] < len(ids):
            self.error = "Select a rule in the table to remove it."
            return False
        rule_id = str(ids[indices[0]])
        removed = self.source.remove_alert_rule(rule_id)
        self.error = "" if removed else f"Rule {rule_id} was already removed."
        with pn.io.hold():
            self._rules.selected.indices = []
            self._update_rules()
        return removed

    def open_alert(self, row: dict) -> None:
        """Show the candles of a fired alert's symbol on its timeframe (sets ``state.symbol``,
        ``state.timeframe`` when the source keeps it, and ``state.page``)."""
        update = {"symbol": str(row["symbol"]), "page": "candles"}
        if row.get("tf") in self.source.timeframes():
            update["timeframe"] = str(row["tf"])
        self.state.param.update(**update)

    @param.depends("error", watch=True)
    def _show_error(self) -> None:
        self._error_pane.object = (f'<span style="color:{DOWN_COLOR}">⚠ '
                                   f"{html.escape(self.error)}</span>")
        self._error_pane.visible = bool(self.error)

    # -- live updates -------------------------------------------------------------------------

    # Bokeh models changed from a widget's callback are changed inside ``pn.io.hold()``: in a
    # server session such a callback may run without the document lock, and the hold
    # dispatches the changes safely (as Panel does for its own models).

    def reload(self) -> None:
        """Replace both tables' data."""
        self._seen_alert = _newest(self.source.fired_alerts(1))
        with pn.io.hold():
            self._rules.data = rule_data(self.source.alert_rules())
            self._fired.data = fired_data(self.source.fired_alerts(FIRED_ROWS))
            self._update_summary()

    def refresh(self) -> bool:
        """Show changed rules and newly fired alerts; return whether anything changed."""
        changed = self._update_rules()
        newest = _newest(self.source.fired_alerts(1))
        if newest == self._seen_alert:
            return changed
        self._seen_alert = newest
        with pn.io.hold():
            sync_table(self._fired, fired_data(self.source.fired_alerts(FIRED_ROWS)), "message")
            self._update_summary()
        return True

    def _update_rules(self) -> bool:
        with pn.io.hold():
            changed = sync_table(self._rules, rule_data(self.source.alert_rules()), "id")
            if changed:
                self._update_summary()
        return changed

    def _update_summary(self) -> None:
        rules, fired = len(self._rules.data["id"]), len(self._fired.data["symbol"])
        self._summary.object = (f'<span class="tf-muted">{rules} rule{"s" * (rules != 1)} · '
                                f"{fired:,} alert{'s' * (fired != 1)} shown</span>")


__all__ = ["EXAMPLES", "AlertsView", "fired_data", "rule_data"]
