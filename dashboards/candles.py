"""The candles page: a live candlestick and volume chart for one symbol and timeframe.

The chart is a Bokeh figure fed by one ``ColumnDataSource``; live updates patch the forming bar
and stream new bars into it, so the figure, its ranges and the user's zoom survive every tick.

Range behaviour (what a user sees)
----------------------------------
- **Following** (the default after a symbol or timeframe change, and after the Reset tool):
  the x range was last set by the view, and it slides right by one bar each time a new bar
  appears, keeping its width.
- **User range**: once the user pans or zooms (the browser sends the new x range to the server,
  where it no longer equals what the view set), the view never moves the x range again until the
  symbol/timeframe changes or Reset returns it to the following window.
- The y ranges (price and volume) always fit the bars inside the visible x window: in the
  browser on every pan, zoom, patch and stream (a small ``CustomJS``), on the server when the
  data is replaced. Pan and wheel zoom act on time only.
"""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import panel as pn

from dashboards.live import PeriodicRefresh
import param
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, CustomJS, HoverTool, Range1d
from bokeh.plotting import figure

from dashboards.source import BAR_COLUMNS, BarSource, empty_bars
from dashboards.state import AppState
from flows.schema import TIMEFRAMES

UP_COLOR = "#26a69a"
DOWN_COLOR = "#ef5350"
FLAT_COLOR = "#787b86"

#: Fewest bar widths the x window spans, so a young series is not drawn with huge candles.
MIN_WINDOW_BARS = 50
#: Empty bar widths kept right of the last bar while following.
RIGHT_PAD_BARS = 3
#: Rows fetched per tick; grown until they overlap the rows already shown.
TAIL_ROWS = 3

_FIT_Y_JS = """
// Deferred: on a stream or patch the data source's listeners (each renderer's view of its
// rows) must see the new columns before anything here asks for a re-render.
setTimeout(() => {
  const d = source.data, t = d.time, lo = d.low, hi = d.high, vol = d.volume;
  const x0 = x.start - half, x1 = x.end + half;
  let ymin = Infinity, ymax = -Infinity, vmax = 0;
  for (let i = 0; i < t.length; i++) {
    if (t[i] < x0 || t[i] > x1) continue;
    if (lo[i] < ymin) ymin = lo[i];
    if (hi[i] > ymax) ymax = hi[i];
    if (vol[i] > vmax) vmax = vol[i];
  }
  if (!isFinite(ymin) || !isFinite(ymax)) { return; }
  const pad = (ymax - ymin) * 0.06 || Math.abs(ymax) * 0.01 || 1;
  y.setv({start: ymin - pad, end: ymax + pad});
  v.setv({start: 0, end: vmax > 0 ? vmax * 1.1 : 1});
}, 0);
"""


def _decimals(price: float) -> int:
    """Return the decimals to show for ``price``: 2, more for sub-unit prices (at most 8)."""
    if price == 0 or abs(price) >= 1:
        return 2
    return min(8, 3 - math.floor(math.log10(abs(price))))


def format_price(price: float | None) -> str:
    """Return ``price`` with the decimals a trader expects (more for sub-unit prices).

    Examples
    --------
    >>> format_price(1234.5), format_price(0.012345), format_price(None)
    ('1,234.50', '0.01235', '—')
    """
    if price is None or not math.isfinite(price):
        return "—"
    return f"{price:,.{_decimals(price)}f}"


def format_change(change: float | None, change_pct: float | None,
                  price: float | None = None) -> str:
    """Return a signed change and percentage, e.g. ``+1.25 (+0.84%)`` (a true minus sign).

    The change gets the decimals of ``price`` (the last price) when given.

    Examples
    --------
    >>> format_change(1.25, 0.00843), format_change(-0.5, -0.01, 49.5), format_change(None, None)
    ('+1.25 (+0.84%)', '−0.50 (−1.00%)', '—')
    >>> format_change(0.0001234, 0.01, price=0.012345)
    '+0.00012 (+1.00%)'
    """
    if change is None or change_pct is None or not math.isfinite(change):
        return "—"
    sign = "+" if change > 0 else "−" if change < 0 else ""
    decimals = _decimals(price if price is not None and math.isfinite(price) else change)
    pct = f"{sign}{abs(change_pct) * 100:.2f}%" if math.isfinite(change_pct) else "—"
    return f"{sign}{abs(change):,.{decimals}f} ({pct})"


def _ms(times: np.ndarray | pd.Index) -> np.ndarray:
    """Return bar times as float milliseconds since the epoch (Bokeh's datetime unit)."""
    return np.asarray(times, dtype="datetime64[ns]").astype("int64") / 1e6


def _columns(bars: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return the chart's columns for ``bars``: time, the bar fields and the candle colour."""
    data = {"time": np.array(bars.index.values, dtype="datetime64[ns]", copy=True)}
    # Writable copies: pandas hands out read-only views, which ColumnDataSource.patch cannot edit.
    data.update({c: np.array(bars[c].to_numpy(), copy=True) for c in BAR_COLUMNS})
    up = data["close"] >= data["open"]
    data["color"] = np.where(up, UP_COLOR, DOWN_COLOR).astype(object)
    return data


class CandlesView(PeriodicRefresh, pn.viewable.Viewer):
    """Live candlesticks and volume for ``state.symbol`` at ``state.timeframe``.

    A header holds a searchable symbol picker, a timeframe picker, the last price with its
    change, and the feed status. The change is measured against the previous bar's close (the
    forming bar's open when there is only one bar), i.e. the move of the latest bar.

    Parameters
    ----------
    state : AppState
        Symbol, timeframe and lookback; the pickers set it, the chart follows it.
    source : BarSource
        Where bars come from.

    Notes
    -----
    Showing the view starts one periodic callback (``period`` ms) for that session; it is
    stopped when the session is destroyed. Each tick costs one ``source.version()`` call when
    nothing changed, otherwise a fetch of the last few bars. Display a view once; make another
    ``CandlesView`` for another output cell or session.

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=30)
    >>> view = CandlesView(AppState.from_source(src), src)
    >>> len(view.data["close"]), view.last_price == float(src.bars("1m", "AAA")["close"].iloc[-1])
    (30, True)
    """

    state = param.ClassSelector(class_=AppState, doc="The session's app state.")

    source = param.Parameter(doc="The BarSource the bars are read from.")

    period = param.Integer(default=1000, bounds=(50, None), doc="""
        Milliseconds between checks of ``source.version()``.""")

    last_price = param.Number(default=None, allow_None=True, doc="""
        Close of the latest bar shown (None without bars).""")

    change = param.Number(default=None, allow_None=True, doc="""
        ``last_price`` minus the previous bar's close (the latest bar's open if it is alone).""")

    change_pct = param.Number(default=None, allow_None=True, doc="""
        ``change`` as a fraction of its reference price.""")

    def __init__(self, state: AppState | None = None, source: BarSource | None = None,
                 **params):
        if source is None:
            raise TypeError("CandlesView needs a source")
        if state is None:
            state = AppState.from_source(source)
        super().__init__(state=state, source=source, **params)
        self._seen_version: int | None = None
        self._symbols: list[str] = []
        self._auto_x: tuple[float, float] | None = None
        self._callback: pn.io.PeriodicCallback | None = None
        self._build_chart()
        self._build_header()
        self._layout = pn.Column(
            self._header, self._message, self._chart, sizing_mode="stretch_width",
            css_classes=["tapeflow-candles"],
        )
        self.reload()

    # -- construction -------------------------------------------------------------------------

    def _build_chart(self) -> None:
        self._cds = ColumnDataSource(data=_columns(empty_bars()), name="candles")
        tools = "xpan,xwheel_zoom,reset,save"
        price = figure(
            name="price", x_axis_type="datetime", x_range=Range1d(0, 1), y_range=Range1d(0, 1),
            tools=tools, active_drag="xpan", active_scroll="xwheel_zoom", height=420,
            sizing_mode="stretch_width", toolbar_location="right", min_border_left=60,
        )
        price.xaxis.visible = False
        price.yaxis.axis_label = "price"
        price.segment(x0="time", y0="low", x1="time", y1="high", color="color",
                      source=self._cds, name="wicks")
        bodies = price.vbar(x="time", width=1, top="open", bottom="close", fill_color="color",
                            line_color="color", source=self._cds, name="bodies")
        price.add_tools(HoverTool(
            renderers=[bodies], mode="vline",
            tooltips=[("time", "@time{%F %H:%M}"), ("open", "@open{0,0.00[0000]}"),
                      ("high", "@high{0,0.00[0000]}"), ("low", "@low{0,0.00[0000]}"),
                      ("close", "@close{0,0.00[0000]}"), ("volume", "@volume{0,0.[00]}"),
                      ("trades", "@trades{0,0}"), ("vwap", "@vwap{0,0.00[0000]}")],
            formatters={"@time": "datetime"},
        ))
        volume = figure(
            name="volume", x_axis_type="datetime", x_range=price.x_range, y_range=Range1d(0, 1),
            tools=tools, active_drag="xpan", active_scroll="xwheel_zoom", height=140,
            sizing_mode="stretch_width", toolbar_location=None, min_border_left=60,
        )
        volume.yaxis.axis_label = "volume"
        volume.yaxis.formatter.use_scientific = False
        volumes = volume.vbar(x="time", width=1, top="volume", bottom=0, fill_color="color",
                              line_color="color", alpha=0.6, source=self._cds, name="volumes")
        self._bar_glyphs = (bodies.glyph, volumes.glyph)
        fit = CustomJS(args={"source": self._cds, "x": price.x_range, "y": price.y_range,
                             "v": volume.y_range, "half": 0}, code=_FIT_Y_JS)
        self._fit_y_js = fit
        price.x_range.js_on_change("start", fit)
        price.x_range.js_on_change("end", fit)
        for event in ("data", "streaming", "patching"):
            self._cds.js_on_change(event, fit)
        self.price_figure = price
        self.volume_figure = volume
        self._chart = pn.pane.Bokeh(column(price, volume, sizing_mode="stretch_width"),
                                    sizing_mode="stretch_width")

    def _build_header(self) -> None:
        self._symbols = list(self.source.symbols())
        self._symbol_input = pn.widgets.AutocompleteInput(
            options=self._options(self.state.symbol), value=self.state.symbol,
            restrict=True, search_strategy="includes", case_sensitive=False, min_characters=1,
            placeholder="Search symbol", width=180, css_classes=["tapeflow-symbol"],
        )
        self._tf_input = pn.widgets.RadioButtonGroup(
            options=list(self.source.timeframes()) or [self.state.timeframe],
            value=self.state.timeframe, css_classes=["tapeflow-tf"],
        )
        self._price_pane = pn.pane.HTML("", css_classes=["tapeflow-price"], min_width=260)
        self._status_pane = pn.pane.HTML("", css_classes=["tapeflow-status"], min_width=300)
        self._message = pn.pane.HTML("", visible=False, css_classes=["tapeflow-message"],
                                     sizing_mode="stretch_width")
        self._symbol_input.param.watch(self._on_symbol_input, "value")
        self._tf_input.param.watch(self._on_tf_input, "value")
        self._header = pn.Row(self._symbol_input, self._tf_input, self._price_pane,
                              pn.layout.HSpacer(), self._status_pane, sizing_mode="stretch_width")

    def _options(self, symbol: str | None) -> list[str]:
        # A restricted autocomplete rejects values outside its options, so a symbol the flow
        # has not listed yet is added to them.
        return self._symbols + ([symbol] if symbol and symbol not in self._symbols else [])

    def _on_symbol_input(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.state.symbol:
            self.state.symbol = event.new

    def _on_tf_input(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.state.timeframe:
            self.state.timeframe = event.new

    def __panel__(self) -> pn.viewable.Viewable:
        self.start()
        return self._layout

    # -- live updates -------------------------------------------------------------------------


    @property
    def data(self) -> dict[str, np.ndarray]:
        """The columns the chart draws (``time``, the bar fields and ``color``)."""
        return self._cds.data

    @property
    def following(self) -> bool:
        """Whether the x range is still the one the view set (no user pan/zoom since)."""
        if self._auto_x is None:
            return True
        x = self.price_figure.x_range
        return (abs(float(x.start) - self._auto_x[0]) < 1
                and abs(float(x.end) - self._auto_x[1]) < 1)

    @param.depends("state.symbol", "state.timeframe", "state.lookback", watch=True)
    def _on_state(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Replace the chart's data with the last ``lookback`` bars and reset the ranges."""
        symbol, tf = self.state.symbol, self.state.timeframe
        self._seen_version = self.source.version()
        bars = self._fetch(self.state.lookback)
        width = 0.8 * TIMEFRAMES[tf] / 1e6
        with pn.io.hold():
            for glyph in self._bar_glyphs:
                glyph.width = width
            self._fit_y_js.args = {**self._fit_y_js.args, "half": width / 2}
            self._cds.data = _columns(bars)
            self._reset_ranges(bars)
            self.price_figure.title.text = f"{symbol or ''} · {tf}"
            if symbol and self._symbol_input.value != symbol:
                self._symbol_input.options = self._options(symbol)
                self._symbol_input.value = symbol
            if self._tf_input.value != tf:
                self._tf_input.value = tf
            self._message.object = (
                f"No bars yet for <b>{html.escape(symbol or 'no symbol')}</b> on {tf}: "
                "waiting for trades." if bars.empty else "")
            self._message.visible = bars.empty
            self._update_quote()
            self._update_status()
        self._push()

    def refresh(self) -> bool:
        """Apply what changed in the source since the last call; return whether anything did.

        The forming bar (and any amended recent bar) is patched in place, new bars are streamed
        with ``rollover=lookback``; the figure, its ranges and the user's zoom are kept.
        """
        version = self.source.version()
        if version == self._seen_version:
            return False
        self._seen_version = version
        symbols = list(self.source.symbols())
        with pn.io.hold():
            if symbols != self._symbols:
                self._symbols = symbols
                self._symbol_input.options = self._options(self.state.symbol)
                self.state.param.symbol.objects = symbols
            self._update_status()
            times = self._cds.data["time"]
            if len(times) == 0:
                if self._fetch(1).empty:
                    return False
                self._seen_version = None
                self.reload()
                return True
            tail = self._tail(times[-1])
            self._patch(tail[tail.index <= times[-1]])
            self._stream(tail[tail.index > times[-1]])
            self._update_quote()
        self._push()
        return True

    def _fetch(self, n: int) -> pd.DataFrame:
        if not self.state.symbol or self.state.timeframe not in self.source.timeframes():
            return empty_bars()
        return self.source.bars(self.state.timeframe, self.state.symbol, n=n)

    def _tail(self, last_shown: np.datetime64) -> pd.DataFrame:
        """Return the newest bars, enough of them to overlap the last bar shown."""
        n = TAIL_ROWS
        while True:
            tail = self._fetch(n)
            if len(tail) < n or tail.index[0] <= last_shown or n >= self.state.lookback:
                return tail
            n = min(4 * n, self.state.lookback)

    def _patch(self, bars: pd.DataFrame) -> None:
        if bars.empty:
            return
        shown = self._cds.data
        rows = np.searchsorted(shown["time"], bars.index.values)
        new = _columns(bars)
        patches: dict[str, list[tuple[int, object]]] = {}
        for j, i in enumerate(rows):
            if i >= len(shown["time"]) or shown["time"][i] != new["time"][j]:
                continue  # a bar older than the window the chart holds
            for name in (*BAR_COLUMNS, "color"):
                if shown[name][i] != new[name][j]:
                    patches.setdefault(name, []).append((int(i), new[name][j]))
        if patches:
            self._cds.patch(patches)

    def _stream(self, bars: pd.DataFrame) -> None:
        if bars.empty:
            return
        follow = self.following
        before = _ms(self._cds.data["time"][-1:])[0]
        self._cds.stream(_columns(bars), rollover=self.state.lookback)
        if follow and self._auto_x is not None:
            shift = _ms(bars.index[-1:])[0] - before
            self._set_x(self._auto_x[0] + shift, self._auto_x[1] + shift)

    # -- ranges -------------------------------------------------------------------------------

    def _set_x(self, start: float, end: float) -> None:
        x = self.price_figure.x_range
        x.update(start=start, end=end, reset_start=start, reset_end=end)
        self._auto_x = (start, end)

    def _reset_ranges(self, bars: pd.DataFrame) -> None:
        step = TIMEFRAMES[self.state.timeframe] / 1e6
        if bars.empty:
            end = _ms(np.array([pd.Timestamp.now("UTC").tz_localize(None).to_datetime64()]))[0]
            self._set_x(end - MIN_WINDOW_BARS * step, end)
            self.price_figure.y_range.update(start=0, end=1)
            self.volume_figure.y_range.update(start=0, end=1)
            return
        times = _ms(bars.index)
        end = times[-1] + RIGHT_PAD_BARS * step
        start = min(times[0] - step, end - MIN_WINDOW_BARS * step)
        self._set_x(start, end)
        low, high = float(np.nanmin(bars["low"])), float(np.nanmax(bars["high"]))
        pad = (high - low) * 0.06 or abs(high) * 0.01 or 1.0
        self.price_figure.y_range.update(start=low - pad, end=high + pad)
        top = float(np.nanmax(bars["volume"]))
        self.volume_figure.y_range.update(start=0, end=top * 1.1 if top > 0 else 1.0)

    # -- header -------------------------------------------------------------------------------

    def _update_quote(self) -> None:
        close = self._cds.data["close"]
        if len(close) == 0 or not math.isfinite(close[-1]):
            self.param.update(last_price=None, change=None, change_pct=None)
        else:
            reference = close[-2] if len(close) > 1 else self._cds.data["open"][-1]
            last = float(close[-1])
            change = last - float(reference)
            pct = change / float(reference) if reference else float("nan")
            self.param.update(last_price=last, change=change, change_pct=pct)
        color = (FLAT_COLOR if not self.change else UP_COLOR if self.change > 0 else DOWN_COLOR)
        meta = self.source.meta(self.state.symbol) if self.state.symbol else {}
        about = " · ".join(html.escape(str(meta[k])) for k in ("name", "sector", "exchange")
                           if meta.get(k))
        self._price_pane.object = (
            f'<span class="tf-last" style="font-size:1.5em;font-weight:600">'
            f"{format_price(self.last_price)}</span> "
            f'<span class="tf-change" style="color:{color};font-weight:600">'
            f"{format_change(self.change, self.change_pct, self.last_price)}</span>"
            f'<div style="color:{FLAT_COLOR};font-size:0.85em">{about}</div>')

    def _update_status(self) -> None:
        status = self.source.status()
        state = str(status.get("state", "?"))
        color = UP_COLOR if state.upper() == "LIVE" else "#f0a30a"
        counts = " · ".join(f"{key} {int(status.get(key, 0)):,}" for key in
                            ("received", "accepted", "quarantined", "duplicates"))
        self._status_pane.object = (
            f'<span style="color:{color};font-weight:600">● {html.escape(state)}</span> '
            f'{html.escape(str(status.get("feed", "")))}'
            f'<div style="color:{FLAT_COLOR};font-size:0.85em">{counts}</div>')

    def _push(self) -> None:
        # Outside a server session (Jupyter), direct Bokeh model changes must be pushed.
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            pn.io.push_notebook(self._chart)
