"""The quality page: how clean the data is, per symbol and per feed, and what was rejected.

Everything is drawn from a :class:`~dashboards.source.MarketSource` for ``state.timeframe``:

- **Scores**: one row per symbol with its latest bar's score (0-100) and the components that
  make it up (see :mod:`flows.quality`), worst first, a low value coloured amber or red. The
  table sorts by any column; clicking a row shows that symbol's history.
- **History**: ``state.symbol``'s score and components over time; a click on a legend entry
  hides or shows its line.
- **Feeds**: each feed's state (coloured), message and trade rates, lag p50/p99, reconnects,
  trade-id gaps, last error and the feed's latest score.
- **Quarantine**: the latest quarantined records, newest first, filtered by reason and by
  symbol text.

Live ticks re-read scores and history only when ``source.version()`` changed (table cells are
patched, history rows patched and streamed), the quarantine only when the quarantined count
changed, and the feeds every tick. No figure is rebuilt.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import panel as pn
import param
import xarray as xr
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    DateFormatter,
    HoverTool,
    Legend,
    LegendItem,
    NumberFormatter,
    Range1d,
    StringFormatter,
    TableColumn,
)
from bokeh.palettes import Category10
from bokeh.plotting import figure
from panel.io.state import set_curdoc

from dashboards.candles import DOWN_COLOR, FLAT_COLOR, UP_COLOR
from dashboards.live import PeriodicRefresh
from dashboards.source import QUARANTINE_COLUMNS, MarketSource
from dashboards.state import AppState
from flows.quality import COMPONENTS

#: A score at or above this is clean enough to show in green.
GOOD = 90.0
#: A score below this is shown in red (amber in between).
POOR = 50.0
WARN_COLOR = "#f0a30a"
SCORE_COLOR = "#2962ff"
#: Column titles of the components.
LABELS: Mapping[str, str] = {
    "score": "score", "rejected": "rejected", "duplicates": "dupes", "late": "late",
    "staleness": "stale", "spike": "spike", "volume_outlier": "vol. outlier", "ohlc": "OHLC",
    "id_gaps": "id gaps"}
COMPONENT_COLORS: Mapping[str, str] = dict(zip(COMPONENTS, Category10[len(COMPONENTS)]))
#: Colour of a feed's state; any other state is amber.
STATE_COLORS: Mapping[str, str] = {"LIVE": UP_COLOR, "REPLAY": UP_COLOR, "FAILED": DOWN_COLOR,
                                   "STOPPED": FLAT_COLOR, "IDLE": FLAT_COLOR}
#: History rows kept by the live chart.
HISTORY_ROWS = 1000
#: Quarantined records read (newest first).
QUARANTINE_ROWS = 1000
#: Characters of a quarantined record's raw payload shown.
RAW_CHARS = 160

_SCORES = ("score", *COMPONENTS)
_FEED_NUMBERS = ("messages_per_s", "trades_per_s", "lag_ms_p50", "lag_ms_p99", "reconnects",
                 "gaps", "score")


def score_colors(values: Sequence[float]) -> np.ndarray:
    """Return a colour cue per score: green from :data:`GOOD`, red below :data:`POOR`, amber
    in between, grey when unknown.

    Examples
    --------
    >>> score_colors([100.0, 75.0, 10.0, float("nan")]).tolist()
    ['#26a69a', '#f0a30a', '#ef5350', '#787b86']
    """
    v = np.asarray(values, dtype=float)
    colors = np.where(v >= GOOD, UP_COLOR, np.where(v >= POOR, WARN_COLOR, DOWN_COLOR))
    return np.where(np.isnan(v), FLAT_COLOR, colors).astype(object)


def latest_scores(quality: xr.Dataset) -> pd.DataFrame:
    """Return each symbol's score and components on the latest row of ``quality``, worst first.

    Ties keep the dataset's symbol order; a symbol whose score is unknown comes last.

    Examples
    --------
    >>> t = np.array(["2024-01-02T09:30", "2024-01-02T09:31"], dtype="datetime64[ns]")
    >>> v = np.array([[100.0, 20.0, 100.0], [100.0, 40.0, 90.0]])
    >>> q = xr.Dataset({k: (("time", "symbol"), v) for k in ("score", *COMPONENTS)},
    ...                coords={"time": t, "symbol": ["A", "B", "C"]})
    >>> latest_scores(q)[["symbol", "score"]].values.tolist()
    [['B', 40.0], ['C', 90.0], ['A', 100.0]]
    """
    columns = ["symbol", *_SCORES]
    if quality.sizes.get("time", 0) == 0 or "score" not in quality:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "symbol" else float)
                             for c in columns})
    last = quality.isel(time=-1)
    frame = pd.DataFrame({"symbol": np.array(last["symbol"].values, dtype=object),
                          **{c: np.asarray(last[c].values, dtype=float) if c in last
                             else np.nan for c in _SCORES}}, columns=columns)
    return frame.sort_values("score", kind="stable", na_position="last").reset_index(drop=True)


def symbol_history(quality: xr.Dataset, symbol: str | None) -> dict[str, np.ndarray]:
    """Return ``time`` and the score and components of ``symbol`` over ``quality``'s rows
    (empty when the symbol has none)."""
    if symbol is None or "score" not in quality or symbol not in quality["symbol"].values:
        return {"time": np.empty(0, "datetime64[ns]"), **{c: np.empty(0) for c in _SCORES}}
    one = quality.sel(symbol=symbol)
    return {"time": np.array(one["time"].values, dtype="datetime64[ns]", copy=True),
            **{c: np.array(one[c].values, dtype=float, copy=True) if c in one
               else np.full(one.sizes["time"], np.nan) for c in _SCORES}}


def filter_quarantine(log: pd.DataFrame, reasons: Sequence[str] = (),
                      symbol: str = "") -> pd.DataFrame:
    """Return the records of ``log`` with one of ``reasons`` (any when empty) whose symbol
    contains ``symbol`` (case-insensitive; any when empty), in their order.

    Examples
    --------
    >>> log = pd.DataFrame({"time": pd.NaT, "symbol": ["AAA", "BBB", "AAB"],
    ...                     "reason": ["bad_time", "spike", "spike"], "raw": ""})
    >>> filter_quarantine(log, ["spike"])["symbol"].tolist()
    ['BBB', 'AAB']
    >>> filter_quarantine(log, symbol="aa")["symbol"].tolist()
    ['AAA', 'AAB']
    """
    keep = np.ones(len(log), bool)
    if len(reasons):
        keep &= log["reason"].isin(list(reasons)).to_numpy()
    if symbol.strip():
        keep &= log["symbol"].astype(str).str.contains(symbol.strip(), case=False,
                                                       regex=False).to_numpy()
    return log[keep].reset_index(drop=True)


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def feed_rows(healths: Sequence[Mapping], scores: Mapping[str, float]) -> pd.DataFrame:
    """Return one row per feed: ``feed state messages_per_s trades_per_s lag_ms_p50 lag_ms_p99
    reconnects gaps last_error score``; a figure the feed does not report is NaN (shown as
    ``—``), ``score`` is the feed's from ``scores``.

    Examples
    --------
    >>> rows = feed_rows([{"feed": "sim", "state": "LIVE", "reconnects": 2,
    ...                    "lag_ms_p50": None}], {"sim": 87.5})
    >>> row = rows.iloc[0]
    >>> row.feed, row.state, float(row.reconnects), float(row.score), row.last_error
    ('sim', 'LIVE', 2.0, 87.5, '')
    >>> bool(np.isnan(row.lag_ms_p50))
    True
    """
    rows = [{"feed": str(h.get("feed", "")), "state": str(h.get("state", "?")),
             **{k: _number(h.get(k)) for k in _FEED_NUMBERS if k != "score"},
             "last_error": str(h.get("last_error") or ""),
             "score": _number(scores.get(str(h.get("feed", ""))))} for h in healths]
    return pd.DataFrame(rows, columns=["feed", "state", *_FEED_NUMBERS[:-1], "last_error",
                                       "score"])


def _ms(times: np.ndarray) -> np.ndarray:
    """Return times as Bokeh's milliseconds since the epoch (NaN for NaT)."""
    t = np.asarray(times, dtype="datetime64[ns]")
    return np.where(np.isnat(t), np.nan, t.view(np.int64) / 1e6)


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float)
                      and math.isnan(a) and math.isnan(b))


def sync_table(cds: ColumnDataSource, data: Mapping[str, np.ndarray], key: str) -> bool:
    """Show ``data`` in ``cds``: patch the cells that changed when the rows are the same (by
    ``key``), replace the data otherwise; return whether anything changed.

    Examples
    --------
    >>> cds = ColumnDataSource({"k": ["a", "b"], "v": [1.0, 2.0]})
    >>> sync_table(cds, {"k": ["a", "b"], "v": [1.0, 3.0]}, "k"), list(cds.data["v"])
    (True, [1.0, 3.0])
    >>> sync_table(cds, {"k": ["a", "b"], "v": [1.0, 3.0]}, "k")
    False
    """
    shown = cds.data
    if set(shown) != set(data) or list(shown[key]) != list(data[key]):
        cds.data = dict(data)
        return True
    patches: dict[str, list[tuple[int, object]]] = {}
    for name, new in data.items():
        old = shown[name]
        for i in range(len(new)):
            a, b = _plain(old[i]), _plain(new[i])
            if not _same(a, b):
                patches.setdefault(name, []).append((i, b))
    if patches:
        cds.patch(patches)
    return bool(patches)


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def sync_series(cds: ColumnDataSource, new: Mapping[str, np.ndarray], rollover: int) -> bool:
    """Bring ``cds`` (a ``time`` column and values) to ``new``: patch changed rows and stream
    rows after the last one shown; replace the data when a row appeared in the middle. Return
    whether anything changed."""
    shown = cds.data
    old_t, new_t = shown["time"], new["time"]
    if len(old_t) == 0 or len(new_t) == 0:
        if len(old_t) == len(new_t) == 0:
            return False
        cds.data = dict(new)
        return True
    overlap_new = new_t[new_t <= old_t[-1]]
    overlap_old = old_t[old_t >= new_t[0]]
    if not np.array_equal(overlap_new, overlap_old):
        cds.data = dict(new)
        return True
    offset = len(old_t) - len(overlap_old)
    patches: dict[str, list[tuple[int, float]]] = {}
    for name in new:
        if name == "time":
            continue
        a, b = shown[name][offset:], new[name][: len(overlap_new)]
        changed = np.flatnonzero(~((a == b) | (np.isnan(a) & np.isnan(b))))
        if len(changed):
            patches[name] = [(int(offset + i), float(b[i])) for i in changed]
    if patches:
        cds.patch(patches)
    tail = {k: v[len(overlap_new):] for k, v in new.items()}
    if len(tail["time"]):
        cds.stream(tail, rollover=rollover)
    return bool(patches) or bool(len(tail["time"]))


def on_row_tap(cds: ColumnDataSource, callback: Callable[[dict], object]) -> None:
    """Call ``callback(row)`` with the values of a row of ``cds`` when it is selected (a tap on
    a table row), and clear the selection so the same row can be tapped again.

    In a server session the callback runs on the next tick, in the session's context: a Bokeh
    callback runs inside Bokeh's handling of the browser's change, where Panel's own updates
    (a page switch) cannot start.
    """
    def selected(attr: str, old: list[int], new: list[int]) -> None:
        if not new:
            return
        index = int(new[0])
        cds.selected.indices = []
        columns = cds.data
        if not 0 <= index < len(next(iter(columns.values()), [])):
            return
        row = {k: _plain(v[index]) for k, v in columns.items()}
        doc = cds.document
        if doc is not None and doc.session_context is not None:
            with set_curdoc(doc):
                pn.state.execute(lambda: callback(row), schedule=True)
        else:
            callback(row)

    cds.selected.on_change("indices", selected)


def _score_data(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    data = {"symbol": np.array(frame["symbol"].astype(str).tolist(), dtype=object)}
    for name in _SCORES:
        values = np.array(frame[name].to_numpy(dtype=float), copy=True)
        data[name] = values
        data[f"{name}_color"] = score_colors(values)
    return data


def _feed_data(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    data = {k: np.array(frame[k].astype(str).tolist(), dtype=object)
            for k in ("feed", "state", "last_error")}
    data.update({k: np.array(frame[k].to_numpy(dtype=float), copy=True) for k in _FEED_NUMBERS})
    data["state_color"] = np.array([STATE_COLORS.get(s.upper(), WARN_COLOR)
                                    for s in data["state"]], dtype=object)
    data["score_color"] = score_colors(data["score"])
    return data


def _quarantine_data(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    raw = [(r.decode("utf-8", "replace") if isinstance(r, bytes) else str(r or ""))[:RAW_CHARS]
           for r in frame["raw"]]
    return {"time": _ms(frame["time"].to_numpy()),
            "symbol": np.array(frame["symbol"].astype(str).tolist(), dtype=object),
            "reason": np.array(frame["reason"].astype(str).tolist(), dtype=object),
            "raw": np.array(raw, dtype=object)}


def _table(cds: ColumnDataSource, columns: list[TableColumn], name: str, height: int,
           **kw) -> DataTable:
    return DataTable(source=cds, columns=columns, index_position=None, height=height,
                     sizing_mode="stretch_width", reorderable=False, name=name, **kw)


class QualityView(PeriodicRefresh, pn.viewable.Viewer):
    """Data quality per symbol and feed, the chosen symbol's history, and the quarantine.

    Parameters
    ----------
    state : AppState
        The timeframe shown and the symbol whose history is drawn; clicking a score row sets
        ``symbol``.
    source : MarketSource
        Where quality, feed health and the quarantine log come from.

    Notes
    -----
    Showing the view starts one periodic callback (``period`` ms) for the session, stopped when
    the session is destroyed (or by :meth:`stop`). A tick costs ``source.version()``,
    ``source.status()`` and ``source.feed_healths()`` when nothing changed.

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=30)
    >>> src.quarantine("BBB", "non_positive_price", at="2024-01-02 15:59")
    >>> view = QualityView(AppState.from_source(src), src)
    >>> view.scores["symbol"].tolist(), len(view.history["time"])
    (['AAA', 'BBB'], 30)
    >>> view.quarantine["reason"].tolist()
    ['non_positive_price']
    """

    state = param.ClassSelector(class_=AppState, doc="The session's app state.")

    source = param.Parameter(doc="The MarketSource read.")

    draw_on_start = True  # draw at once, then refresh periodically

    period = param.Integer(default=2000, bounds=(50, None), doc="""
        Milliseconds between checks of the source.""")

    reasons = param.List(default=[], item_type=str, doc="""
        Quarantine reasons shown (every reason when empty).""")

    symbol_filter = param.String(default="", doc="""
        Show the quarantined records whose symbol contains this text (case-insensitive).""")

    def __init__(self, state: AppState | None = None, source: MarketSource | None = None,
                 **params):
        if source is None:
            raise TypeError("QualityView needs a source")
        if state is None:
            state = AppState.from_source(source)
        super().__init__(state=state, source=source, **params)
        self._seen_version: int | None = None
        self._seen_quarantined: object = None
        self._callback: pn.io.PeriodicCallback | None = None
        self._quality = xr.Dataset()
        self._feed_scores: dict[str, float] = {}
        self._log = pd.DataFrame(columns=list(QUARANTINE_COLUMNS))
        self._build_scores()
        self._build_history()
        self._build_feeds()
        self._build_quarantine()
        self._tf_input = pn.widgets.RadioButtonGroup(
            options=list(self.source.timeframes()) or [self.state.timeframe],
            value=self.state.timeframe, css_classes=["tapeflow-tf"])
        self._tf_input.param.watch(self._on_tf_input, "value")
        self._summary = pn.pane.HTML("", css_classes=["tapeflow-summary"], min_width=400)
        self._layout = pn.Column(
            pn.Row(self._tf_input, self._summary, sizing_mode="stretch_width"),
            pn.Row(pn.Column(pn.pane.HTML("<b>Scores</b> · latest bar, worst first (0-100, "
                                          "100 is clean); click a row for its history"),
                             self._scores_pane, width=720),
                   pn.Column(self._history_pane, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            pn.pane.HTML("<b>Feeds</b>"), self._feeds_pane,
            pn.pane.HTML("<b>Quarantine</b> · newest first"),
            pn.Row(self._reason_input, self._symbol_input, self._quarantine_count,
                   sizing_mode="stretch_width"),
            self._quarantine_pane,
            sizing_mode="stretch_width", css_classes=["tapeflow-quality"],
        )
        self.reload()

    # -- construction -------------------------------------------------------------------------

    def _build_scores(self) -> None:
        self._scores = ColumnDataSource(_score_data(latest_scores(xr.Dataset())),
                                        name="quality_scores")
        columns = [TableColumn(field="symbol", title="symbol", width=80)] + [
            TableColumn(field=name, title=LABELS[name], width=70 if name == "score" else 62,
                        formatter=NumberFormatter(
                            format="0", text_align="right", nan_format="—",
                            text_color=f"{name}_color",
                            font_style="bold" if name == "score" else "normal"))
            for name in _SCORES]
        table = _table(self._scores, columns, "quality_table", 360, sortable=True)
        on_row_tap(self._scores, lambda row: setattr(self.state, "symbol", row["symbol"]))
        self._scores_pane = pn.pane.Bokeh(table, sizing_mode="stretch_width")

    def _build_history(self) -> None:
        self._history = ColumnDataSource(symbol_history(xr.Dataset(), None),
                                         name="quality_history")
        fig = figure(name="quality_history_figure", x_axis_type="datetime", height=380,
                     y_range=Range1d(-3, 103), sizing_mode="stretch_width",
                     tools="xpan,xwheel_zoom,reset,save", active_drag="xpan",
                     active_scroll="xwheel_zoom", min_border_left=50, toolbar_location="above")
        fig.yaxis.axis_label = "0-100 (100 is clean)"
        # The score is drawn last, over the components (clean ones share its line at 100),
        # and listed first.
        lines = {name: fig.line(x="time", y=name, source=self._history, line_width=1.5,
                                color=COMPONENT_COLORS[name], alpha=0.8) for name in COMPONENTS}
        lines["score"] = fig.line(x="time", y="score", source=self._history, line_width=3,
                                  color=SCORE_COLOR)
        # Dots mark the rows: the time axis skips bars in which nothing traded.
        dots = fig.scatter(x="time", y="score", source=self._history, size=5, color=SCORE_COLOR)
        items = [LegendItem(label=LABELS["score"], renderers=[lines["score"], dots])] + [
            LegendItem(label=LABELS[name], renderers=[lines[name]]) for name in COMPONENTS]
        fig.add_layout(Legend(items=items, click_policy="hide", label_text_font_size="8pt",
                              background_fill_alpha=0.4), "right")
        fig.add_tools(HoverTool(mode="vline", renderers=[lines["score"]],
                                formatters={"@time": "datetime"},
                                tooltips=[("time", "@time{%F %H:%M}")]
                                + [(LABELS[n], f"@{n}{{0}}") for n in _SCORES]))
        self.history_figure = fig
        self._history_pane = pn.pane.Bokeh(fig, sizing_mode="stretch_width")

    def _build_feeds(self) -> None:
        self._feeds = ColumnDataSource(_feed_data(feed_rows([], {})), name="feeds")
        number = {"text_align": "right", "nan_format": "—"}
        columns = [
            TableColumn(field="feed", title="feed", width=120),
            TableColumn(field="state", title="state", width=90,
                        formatter=StringFormatter(text_color="state_color", font_style="bold")),
            TableColumn(field="messages_per_s", title="msgs/s", width=70,
                        formatter=NumberFormatter(format="0,0.0", **number)),
            TableColumn(field="trades_per_s", title="trades/s", width=70,
                        formatter=NumberFormatter(format="0,0.0", **number)),
            TableColumn(field="lag_ms_p50", title="lag p50 ms", width=80,
                        formatter=NumberFormatter(format="0,0.0", **number)),
            TableColumn(field="lag_ms_p99", title="lag p99 ms", width=80,
                        formatter=NumberFormatter(format="0,0.0", **number)),
            TableColumn(field="reconnects", title="reconnects", width=80,
                        formatter=NumberFormatter(format="0,0", **number)),
            TableColumn(field="gaps", title="id gaps", width=70,
                        formatter=NumberFormatter(format="0,0", **number)),
            TableColumn(field="score", title="score", width=60,
                        formatter=NumberFormatter(format="0", text_color="score_color",
                                                  font_style="bold", **number)),
            TableColumn(field="last_error", title="last error", width=320),
        ]
        self._feeds_pane = pn.pane.Bokeh(_table(self._feeds, columns, "feeds_table", 110,
                                                sortable=False),
                                         sizing_mode="stretch_width")

    def _build_quarantine(self) -> None:
        self._quarantined = ColumnDataSource(_quarantine_data(self._log), name="quarantine")
        columns = [
            TableColumn(field="time", title="event time", width=150,
                        formatter=DateFormatter(format="%Y-%m-%d %H:%M:%S", nan_format="—")),
            TableColumn(field="symbol", title="symbol", width=90),
            TableColumn(field="reason", title="reason", width=140),
            TableColumn(field="raw", title="raw", width=500),
        ]
        self._quarantine_pane = pn.pane.Bokeh(
            _table(self._quarantined, columns, "quarantine_table", 280, sortable=True),
            sizing_mode="stretch_width")
        self._reason_input = pn.widgets.MultiChoice(
            options=[], value=list(self.reasons), placeholder="every reason", width=360,
            css_classes=["tapeflow-reasons"])
        self._symbol_input = pn.widgets.TextInput(
            value=self.symbol_filter, placeholder="symbol contains…", width=180,
            css_classes=["tapeflow-symbol-filter"])
        self._reason_input.param.watch(lambda e: setattr(self, "reasons", list(e.new)), "value")
        self._symbol_input.param.watch(lambda e: setattr(self, "symbol_filter", e.new or ""),
                                       "value_input")
        self._quarantine_count = pn.pane.HTML("", css_classes=["tf-muted"])

    def __panel__(self) -> pn.viewable.Viewable:
        self.start()
        return self._layout

    # -- what is shown ------------------------------------------------------------------------

    @property
    def scores(self) -> pd.DataFrame:
        """The scores table's rows: ``symbol``, ``score`` and the components."""
        return pd.DataFrame({k: self._scores.data[k] for k in ("symbol", *_SCORES)})

    @property
    def history(self) -> dict[str, np.ndarray]:
        """The history chart's columns: ``time``, ``score`` and the components."""
        return self._history.data

    @property
    def feeds(self) -> pd.DataFrame:
        """The feeds table's rows (see :func:`feed_rows`)."""
        return pd.DataFrame({k: self._feeds.data[k] for k in feed_rows([], {}).columns})

    @property
    def quarantine(self) -> pd.DataFrame:
        """The quarantine table's rows after the filters (``time`` in ms since the epoch)."""
        return pd.DataFrame({k: self._quarantined.data[k] for k in QUARANTINE_COLUMNS})

    # -- live updates -------------------------------------------------------------------------

    def _on_tf_input(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.state.timeframe:
            self.state.timeframe = event.new

    @param.depends("state.timeframe", watch=True)
    def _on_timeframe(self) -> None:
        self.reload()

    # Bokeh models changed from a widget's or a tap's callback are changed inside
    # ``pn.io.hold()``: in a server session such a callback may run without the document lock,
    # and the hold dispatches the changes safely (as Panel does for its own models).

    @param.depends("state.symbol", watch=True)
    def _on_symbol(self) -> None:
        with pn.io.hold():
            self._history.data = symbol_history(self._quality, self.state.symbol)
            self._update_title()

    @param.depends("reasons", "symbol_filter", watch=True)
    def _on_filter(self) -> None:
        if list(self._reason_input.value) != self.reasons:
            self._reason_input.value = list(self.reasons)
        if self._symbol_input.value_input != self.symbol_filter:
            self._symbol_input.value = self._symbol_input.value_input = self.symbol_filter
        with pn.io.hold():
            self._show_quarantine()

    def reload(self) -> None:
        """Replace every table's and the chart's data for ``state.timeframe``."""
        if self._tf_input.value != self.state.timeframe:
            self._tf_input.value = self.state.timeframe
        self._seen_version = self.source.version()
        self._fetch_quality()
        with pn.io.hold():
            self._scores.data = _score_data(latest_scores(self._quality))
            self._history.data = symbol_history(self._quality, self.state.symbol)
            self._seen_quarantined = self.source.status().get("quarantined")
            self._fetch_quarantine()
            self._update_feeds()
            self._update_title()
            self._update_summary()

    def refresh(self) -> bool:
        """Apply what changed in the source since the last call; return whether anything did.

        Scores and history are re-read when ``source.version()`` changed, the quarantine log
        when the quarantined count did; feed health is read on every call.
        """
        changed = False
        version = self.source.version()
        with pn.io.hold():
            if version != self._seen_version:
                self._seen_version = version
                self._fetch_quality()
                changed |= sync_table(self._scores, _score_data(latest_scores(self._quality)),
                                      "symbol")
                changed |= sync_series(self._history,
                                       symbol_history(self._quality, self.state.symbol),
                                       HISTORY_ROWS)
            quarantined = self.source.status().get("quarantined")
            if quarantined != self._seen_quarantined:
                self._seen_quarantined = quarantined
                self._fetch_quarantine()
                changed = True
            changed |= self._update_feeds()
            if changed:
                self._update_summary()
        return changed

    def _fetch_quality(self) -> None:
        tf = self.state.timeframe
        if tf not in self.source.timeframes():
            self._quality, self._feed_scores = xr.Dataset(), {}
            return
        self._quality = self.source.quality(tf)
        feeds = self.source.quality_feeds(tf)
        if "score" in feeds and feeds.sizes.get("time", 0):
            last = feeds["score"].isel(time=-1)
            self._feed_scores = {str(f): float(v) for f, v in
                                 zip(last["feed"].values, last.values)}
        else:
            self._feed_scores = {}

    def _fetch_quarantine(self) -> None:
        self._log = self.source.quarantine_log(QUARANTINE_ROWS)
        seen = sorted(set(self._log["reason"].astype(str)) | set(self.reasons))
        if list(self._reason_input.options) != seen:
            self._reason_input.options = seen
        self._show_quarantine()

    def _show_quarantine(self) -> None:
        shown = filter_quarantine(self._log, self.reasons, self.symbol_filter)
        self._quarantined.data = _quarantine_data(shown)
        self._quarantine_count.object = (f"{len(shown):,} of the latest {len(self._log):,} "
                                         "records")

    def _update_feeds(self) -> bool:
        rows = feed_rows(self.source.feed_healths(), self._feed_scores)
        return sync_table(self._feeds, _feed_data(rows), "feed")

    def _update_title(self) -> None:
        symbol = self.state.symbol or "no symbol"
        empty = "" if len(self._history.data["time"]) else " · no quality rows yet"
        self.history_figure.title.text = (f"{symbol} · {self.state.timeframe} · score and "
                                          f"components (click the legend to hide a line){empty}")

    def _update_summary(self) -> None:
        data = self._scores.data
        status = self.source.status()
        quarantined = f"{int(status.get('quarantined') or 0):,} trades quarantined"
        if len(data["symbol"]) == 0:
            self._summary.object = (f'<span class="tf-muted">No quality scores yet: waiting for '
                                    f"bars · {quarantined}</span>")
            return
        scores = data["score"]
        low = int(np.sum(scores < GOOD))
        worst, components = data["symbol"][0], {c: data[c][0] for c in COMPONENTS}
        cause = min(components, key=lambda c: components[c])
        why = f" ({LABELS[cause]} {components[cause]:.0f})" if components[cause] < 100 else ""
        self._summary.object = (
            f"{len(scores)} symbols · "
            f'<span style="color:{WARN_COLOR if low else UP_COLOR};font-weight:600">{low} below '
            f"{GOOD:.0f}</span> · worst <b>{html.escape(str(worst))}</b> "
            f'<span style="color:{data["score_color"][0]};font-weight:600">{scores[0]:.0f}</span>'
            f"{html.escape(why)} · {quarantined}")


__all__ = ["GOOD", "POOR", "QualityView", "feed_rows", "filter_quarantine", "latest_scores",
           "on_row_tap", "score_colors", "symbol_history", "sync_series", "sync_table"]
