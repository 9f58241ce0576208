"""The candles page: live candlesticks, volume, indicators and alerts for one symbol and timeframe.

The chart is a column of Bokeh figures sharing one x range, fed by one ``ColumnDataSource`` that
holds each bar and the symbol's indicators on that bar (``source.symbol_indicators``); live
updates patch the forming bar and stream new bars into it, so the figures, their ranges and the
user's zoom survive every tick.

What the chart shows
--------------------
- **Candles and volume**, a crosshair through every pane, and a hover with the bar's time,
  O/H/L/C, volume and the values of the indicators shown, prices with a trader's decimals.
- **Overlays** on the price, toggled by buttons: SMA 20/50/200, EMA 12/26/50, Bollinger bands
  (upper, middle, lower over a light band) and the session VWAP. Default: SMA 20 and SMA 50.
- **Panes** below the volume, toggled by buttons: RSI 14 (30/70 guides), MACD (line, signal,
  histogram coloured by sign), Stochastic %K/%D (20/80 guides) and ATR 14. Default: RSI.
  Toggling shows or hides renderers and figures; a pane's figure is built the first time it is
  shown (a session pays only for the panes it uses), and never rebuilt.
- **The forming bar** (``provisional`` in the source) is drawn translucent with a dashed
  outline, and every indicator line ends at the last closed bar, its segment to the forming bar
  dashed and lighter (a two-row source of its own). The legend's "forming" entry says so.
- **Alerts** fired for the symbol and timeframe (``source.fired_alerts``, when the source has
  it): a triangle under the bar for a rising condition (``crosses_above``, ``>``, ``>=``), over
  it for a falling one, with the rule and message on hover; re-read when a new alert fires.

Range behaviour (what a user sees)
----------------------------------
- **Following** (the default after a symbol or timeframe change, and after the Reset tool):
  the x range was last set by the view, and it slides right by one bar each time a new bar
  appears, keeping its width.
- **User range**: once the user pans or zooms (the browser sends the new x range to the server,
  where it no longer equals what the view set), the view never moves the x range again until the
  symbol/timeframe changes or Reset returns it to the following window.
- The y ranges (price with the overlays shown, volume, MACD and ATR) always fit the bars inside
  the visible x window: in the browser on every pan, zoom, patch, stream and toggle (a small
  ``CustomJS``), on the server when the data is replaced. RSI and Stochastic keep 0-100. Pan and
  wheel zoom act on time only.
"""
from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.layouts import column
from bokeh.models import (
    BoxAnnotation,
    ColumnDataSource,
    CrosshairTool,
    CustomJS,
    CustomJSHover,
    CustomJSTransform,
    DatetimeAxis,
    DatetimeTicker,
    DatetimeTickFormatter,
    GlyphRenderer,
    Grid,
    HoverTool,
    Legend,
    LegendItem,
    Range1d,
    Span,
)
from bokeh.models import Line as LineGlyph
from bokeh.plotting import figure
from bokeh.transform import transform

from dashboards.live import PeriodicRefresh
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
#: Fill opacity of the forming bar's candle and MACD bar (closed bars are opaque).
FORMING_ALPHA = 0.3
#: Fired alerts read (newest first) whenever the newest one changes.
ALERT_ROWS = 500
#: Height in pixels of each indicator pane.
PANE_HEIGHT = 130

#: The columns of ``symbol_indicators`` the chart holds (besides ``provisional``).
INDICATOR_COLUMNS: tuple[str, ...] = (
    "sma_20", "sma_50", "sma_200", "ema_12", "ema_26", "ema_50", "rsi_14", "macd", "macd_signal",
    "macd_hist", "bb_upper", "bb_middle", "bb_lower", "stoch_k", "stoch_d", "atr_14", "adx_14",
    "volume_sma_20", "vwap_session")


class Line(NamedTuple):
    """One indicator line: the column it draws, its label (legend, hover) and its colour."""

    column: str
    label: str
    color: str


class Overlay(NamedTuple):
    """Lines drawn on the price figure, shown and hidden together by one toggle."""

    label: str
    lines: tuple[Line, ...]


class Pane(NamedTuple):
    """A small figure below the volume: its lines, its horizontal guides, a fixed y range (None:
    fitted to the visible bars), the histogram column drawn as bars, and the hover's number
    format (``price``: a trader's price decimals, else a Bokeh numeral format)."""

    label: str
    lines: tuple[Line, ...]
    guides: tuple[float, ...] = ()
    y_range: tuple[float, float] | None = None
    histogram: str | None = None
    number: str = "price"


_BB_COLOR = "#5c6bc0"
#: Price overlays, in button order.
OVERLAYS: dict[str, Overlay] = {
    "sma_20": Overlay("SMA 20", (Line("sma_20", "SMA 20", "#2962ff"),)),
    "sma_50": Overlay("SMA 50", (Line("sma_50", "SMA 50", "#ff9800"),)),
    "sma_200": Overlay("SMA 200", (Line("sma_200", "SMA 200", "#9c27b0"),)),
    "ema_12": Overlay("EMA 12", (Line("ema_12", "EMA 12", "#00acc1"),)),
    "ema_26": Overlay("EMA 26", (Line("ema_26", "EMA 26", "#d81b60"),)),
    "ema_50": Overlay("EMA 50", (Line("ema_50", "EMA 50", "#8d6e63"),)),
    "bb": Overlay("Bollinger", (Line("bb_upper", "BB upper", _BB_COLOR),
                                Line("bb_middle", "BB middle", _BB_COLOR),
                                Line("bb_lower", "BB lower", _BB_COLOR))),
    "vwap": Overlay("VWAP", (Line("vwap_session", "VWAP", "#f9a825"),)),
}
#: Indicator panes, top to bottom.
PANES: dict[str, Pane] = {
    "rsi": Pane("RSI 14", (Line("rsi_14", "RSI 14", "#7e57c2"),), guides=(30, 70),
                y_range=(0, 100), number="0.0"),
    "macd": Pane("MACD", (Line("macd", "MACD", "#2962ff"),
                          Line("macd_signal", "signal", "#ff6d00")),
                 guides=(0,), histogram="macd_hist"),
    "stoch": Pane("Stoch", (Line("stoch_k", "%K", "#2962ff"), Line("stoch_d", "%D", "#ff6d00")),
                  guides=(20, 80), y_range=(0, 100), number="0.0"),
    "atr": Pane("ATR 14", (Line("atr_14", "ATR 14", "#ef6c00"),)),
}
#: Columns shown with a price's decimals in the hovers.
PRICE_COLUMNS: tuple[str, ...] = (
    "open", "high", "low", "close", "vwap",
    *(line.column for overlay in OVERLAYS.values() for line in overlay.lines),
    *(c for pane in PANES.values() if pane.number == "price"
      for c in (*(line.column for line in pane.lines), pane.histogram) if c))
#: Every indicator line's column (what the two-row "forming" source holds).
LINE_COLUMNS: tuple[str, ...] = tuple(
    line.column for spec in (*OVERLAYS.values(), *PANES.values()) for line in spec.lines)
_FALLING_OPS = frozenset({"crosses_below", "<", "<="})

_FIT_Y_JS = """
// Deferred: on a stream or patch the data source's listeners (each renderer's view of its
// rows) must see the new columns before anything here asks for a re-render.
setTimeout(() => {
  const d = source.data, t = d.time, n = t.length;
  const x0 = x.start - half, x1 = x.end + half;
  let i0 = 0, i1 = n;
  while (i0 < n && t[i0] < x0) i0++;
  while (i1 > i0 && t[i1 - 1] > x1) i1--;
  const extent = (columns) => {
    let lo = Infinity, hi = -Infinity;
    for (const c of columns) {
      const a = d[c];
      for (let i = i0; i < i1; i++) { const v = a[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
    }
    return [lo, hi];
  };
  const fit = (range, [lo, hi]) => {
    if (!isFinite(lo) || !isFinite(hi)) return false;
    const pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.01 || 1;
    range.setv({start: lo - pad, end: hi + pad});
    return true;
  };
  const columns = ["low", "high"];
  for (const [renderer, names] of overlays) if (renderer.visible) columns.push(...names);
  if (!fit(y, extent(columns))) return;
  const vmax = extent(["volume"])[1];
  v.setv({start: 0, end: vmax > 0 ? vmax * 1.1 : 1});
  for (const [pane, names] of panes) if (pane.visible) fit(pane.y_range, extent(names));
}, 0);
"""

# The lines stop at the last closed bar: the forming source draws their last segment dashed.
_CLOSED_ONLY_JS = """
const p = source.data.provisional, out = new Float64Array(xs.length);
for (let i = 0; i < xs.length; i++) out[i] = p != null && p[i] ? NaN : xs[i];
return out;
"""

# The browser's twin of format_price (same decimals rule as _decimals).
_PRICE_HOVER_JS = """
if (value == null || !isFinite(value)) return "\u2014";
const a = Math.abs(value);
const d = a === 0 || a >= 1 ? 2 : Math.min(8, 3 - Math.floor(Math.log10(a)));
return value.toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
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


def _indicator_arrays(indicators: pd.DataFrame | None,
                      index: pd.DatetimeIndex) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return writable indicator columns and the provisional flags on the rows of ``index``.

    Rows are matched by time, so indicators read a moment after the bars (one more bar, or a
    longer window) still line up; a row or column the source lacks is NaN (not provisional).
    """
    n = len(index)
    if indicators is None:
        return {c: np.full(n, np.nan) for c in INDICATOR_COLUMNS}, np.zeros(n, bool)
    if not indicators.index.equals(index):
        indicators = indicators.reindex(index)
    values = {c: (indicators[c].to_numpy(dtype=float, copy=True) if c in indicators.columns
                  else np.full(n, np.nan)) for c in INDICATOR_COLUMNS}
    provisional = (indicators["provisional"].to_numpy(dtype=bool, na_value=False).copy()
                   if "provisional" in indicators.columns else np.zeros(n, bool))
    return values, provisional


def _columns(bars: pd.DataFrame, indicators: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Return the chart's columns for ``bars``: time, the bar fields, the indicators, the
    ``provisional`` flag and the styles derived from them (candle and MACD bar colours, the
    forming bar's fill alpha and dash, and ``phase`` for the hover)."""
    data = {"time": np.array(bars.index.values, dtype="datetime64[ns]", copy=True)}
    # Writable copies: pandas hands out read-only views, which ColumnDataSource.patch cannot edit.
    data.update({c: np.array(bars[c].to_numpy(), copy=True) for c in BAR_COLUMNS})
    values, provisional = _indicator_arrays(indicators, bars.index)
    data.update(values)
    data["provisional"] = provisional
    up = data["close"] >= data["open"]
    data["color"] = np.where(up, UP_COLOR, DOWN_COLOR).astype(object)
    data["hist_color"] = np.where(values["macd_hist"] >= 0, UP_COLOR, DOWN_COLOR).astype(object)
    data["fill_alpha"] = np.where(provisional, FORMING_ALPHA, 1.0)
    data["line_dash"] = np.where(provisional, "dashed", "solid").astype(object)
    data["phase"] = np.where(provisional, "forming", "").astype(object)
    return data


def _take(data: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in data.items()}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Return whether two columns hold the same values (NaN equals NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _forming_columns(data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the last closed row and the forming row of ``data``'s lines (none without a
    forming bar): what the dashed last segments draw."""
    n = len(data["time"])
    k = min(n, 2) if n and data["provisional"][-1] else 0
    return {c: np.array(data[c][n - k:], copy=True) for c in ("time", *LINE_COLUMNS)}


def _pane_columns(pane: Pane) -> list[str]:
    """Return the columns a pane draws (its y range fits them)."""
    return [line.column for line in pane.lines] + ([pane.histogram] if pane.histogram else [])


def _rising(rule: str) -> bool:
    """Return whether an alert rule's condition is a rise (its marker goes under the bar)."""
    return not _FALLING_OPS.intersection(str(rule).split())


def alert_markers(alerts: pd.DataFrame | None, symbol: str | None, tf: str,
                  bars: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the alert markers' columns: one per alert of ``symbol`` on ``tf`` whose bar time
    is among ``bars["time"]``, under the bar's low for a rising condition (an upward triangle)
    and over its high for a falling one; alerts on the same bar and side are stacked.

    Parameters
    ----------
    alerts : DataFrame or None
        Fired alerts as ``fired_alerts()`` returns them (``time`` is the bar's open time).
    symbol, tf : str
        The symbol and timeframe shown.
    bars : mapping of str to array
        The chart's columns (``time``, ``high``, ``low``).

    Examples
    --------
    >>> t = np.array(["2024-01-02T09:30", "2024-01-02T09:31"], dtype="datetime64[ns]")
    >>> bars = {"time": t, "high": np.array([11.0, 12.0]), "low": np.array([9.0, 10.0])}
    >>> fired = pd.DataFrame({"time": t[[1, 1]], "fired_at": t[[1, 1]], "symbol": ["A", "B"],
    ...                       "tf": "1m", "rule": ["A close crosses_above 11 on 1m", "B x"],
    ...                       "value": 11.5, "message": ["A crossed above 11", "B"]})
    >>> m = alert_markers(fired, "A", "1m", bars)
    >>> (m["time"] == t[1]).tolist(), m["marker"].tolist(), bool(m["y"][0] < 10.0)
    ([True], ['triangle'], True)
    """
    empty = {"time": np.empty(0, "datetime64[ns]"), "y": np.empty(0), "value": np.empty(0),
             "fired_at": np.empty(0, "datetime64[ns]"),
             **{c: np.empty(0, object) for c in ("marker", "color", "rule", "message")}}
    shown = np.asarray(bars["time"], dtype="datetime64[ns]")
    if alerts is None or alerts.empty or symbol is None or not len(shown):
        return empty
    mine = alerts[(alerts["symbol"] == symbol) & (alerts["tf"] == tf)]
    times = pd.to_datetime(mine["time"], utc=True).dt.tz_localize(None).to_numpy("datetime64[ns]")
    rows = np.searchsorted(shown, times).clip(0, len(shown) - 1)
    hit = shown[rows] == times
    if not hit.any():
        return empty
    mine, rows, times = mine[hit], rows[hit], times[hit]
    high, low = np.asarray(bars["high"], float), np.asarray(bars["low"], float)
    spread = (high - low)[np.isfinite(high - low) & (high > low)]
    finite = high[np.isfinite(high)]
    pad = (float(np.median(spread)) if len(spread)
           else abs(float(finite.max())) * 0.002 if len(finite) else 0.0) or 1.0
    rising = np.array([_rising(r) for r in mine["rule"]], dtype=bool)
    stack = pd.Series(rising).groupby([times, rising]).cumcount().to_numpy() + 1
    fired_at = pd.to_datetime(mine["fired_at"], utc=True).dt.tz_localize(None)
    return {
        "time": times,
        "y": np.where(rising, low[rows] - pad * stack, high[rows] + pad * stack),
        "marker": np.where(rising, "triangle", "inverted_triangle").astype(object),
        "color": np.where(rising, UP_COLOR, DOWN_COLOR).astype(object),
        "rule": mine["rule"].astype(str).to_numpy(object),
        "message": mine["message"].astype(str).to_numpy(object),
        "value": mine["value"].to_numpy(dtype=float),
        "fired_at": fired_at.to_numpy("datetime64[ns]"),
    }


class CandlesView(PeriodicRefresh, pn.viewable.Viewer):
    """Live candlesticks, volume, indicators and alerts for ``state.symbol`` at
    ``state.timeframe``.

    A header holds a searchable symbol picker, a timeframe picker, the last price with its
    change, and the feed status; below it, the overlay and pane toggles. The change is measured
    against the previous bar's close (the forming bar's open when there is only one bar), i.e.
    the move of the latest bar.

    Parameters
    ----------
    state : AppState
        Symbol, timeframe and lookback; the pickers set it, the chart follows it.
    source : BarSource
        Where bars come from; its ``symbol_indicators`` and ``fired_alerts`` are used when it
        has them (indicators are NaN and no alert is marked otherwise). Frames it returns are
        only read, never changed.

    Notes
    -----
    Showing the view starts one periodic callback (``period`` ms) for that session; it is
    stopped when the session is destroyed. Each tick costs one ``source.version()`` call and one
    ``source.fired_alerts(1)`` call when nothing changed, otherwise a fetch of the last few
    bars and the symbol's indicators (both cached by the flow per version: a session only
    slices them). In a served session the ticks wait until the page has loaded. Display a view
    once; make another ``CandlesView`` for another output cell or session.

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> src = FrameSource.synthetic(["AAA", "BBB"], n_bars=30)
    >>> view = CandlesView(AppState.from_source(src), src)
    >>> len(view.data["close"]), view.last_price == float(src.bars("1m", "AAA")["close"].iloc[-1])
    (30, True)
    >>> view.overlays, view.panes, view.pane_figures["rsi"].visible
    (['sma_20', 'sma_50'], ['rsi'], True)
    """

    state = param.ClassSelector(class_=AppState, doc="The session's app state.")

    source = param.Parameter(doc="The BarSource the bars are read from.")

    period = param.Integer(default=1000, bounds=(50, None), doc="""
        Milliseconds between checks of ``source.version()``.""")

    overlays = param.ListSelector(
        default=["sma_20", "sma_50"], objects={o.label: k for k, o in OVERLAYS.items()}, doc="""
        Overlays drawn on the price (keys of ``OVERLAYS``).""")

    panes = param.ListSelector(
        default=["rsi"], objects={p.label: k for k, p in PANES.items()}, doc="""
        Indicator panes shown below the volume (keys of ``PANES``).""")

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
        self._alerts_key: tuple | None = None
        self._fired: pd.DataFrame | None = None
        self._build_chart()
        self._build_header()
        self._layout = pn.Column(
            self._header, self._toggles, self._message, self._chart,
            sizing_mode="stretch_width", css_classes=["tapeflow-candles"],
        )
        self._show_overlays()
        self._show_panes()
        self.reload()

    # -- construction -------------------------------------------------------------------------

    def _figure(self, name: str, height: int, y_range: Range1d, x_range=None) -> figure:
        fig = figure(
            name=name, x_axis_type=None, x_range=x_range or Range1d(0, 1), y_range=y_range,
            tools="xpan,xwheel_zoom,reset,save", active_drag="xpan", active_scroll="xwheel_zoom",
            height=height, sizing_mode="stretch_width", toolbar_location=None,
            min_border_left=60,
        )
        # One time ticker for every figure: a datetime axis of its own is some twenty models,
        # and all the figures show the same times.
        fig.add_layout(DatetimeAxis(ticker=self._time_ticker, formatter=self._time_format),
                       "below")
        fig.add_layout(Grid(dimension=0, ticker=self._time_ticker))
        fig.add_tools(CrosshairTool(overlay=[self._cursor, Span(
            dimension="width", line_color=FLAT_COLOR, line_dash="dotted", line_width=1)]))
        return fig

    def _lines(self, fig: figure, lines: tuple[Line, ...]) -> list:
        """Draw ``lines`` on ``fig``: each up to the last closed bar, then dashed to the forming
        bar; return the renderers, the solid ones first."""
        # Plain GlyphRenderers: figure.line would also build selection and muted glyph copies,
        # which these lines never use, and a session builds dozens of them.
        solid, dashed = [], []
        for line in lines:
            solid.append(GlyphRenderer(
                data_source=self._cds, name=f"candles_{line.column}", glyph=LineGlyph(
                    x="time", y=transform(line.column, self._closed_only), line_color=line.color,
                    line_width=1.5)))
            dashed.append(GlyphRenderer(
                data_source=self._forming, name=f"candles_{line.column}_forming", glyph=LineGlyph(
                    x="time", y=line.column, line_color=line.color, line_width=1.5,
                    line_alpha=0.6, line_dash="dashed")))
        fig.renderers.extend(solid + dashed)
        return solid + dashed

    def _build_chart(self) -> None:
        self._cds = ColumnDataSource(data=_columns(empty_bars()), name="candles")
        self._forming = ColumnDataSource(data=_forming_columns(self._cds.data),
                                         name="candles_forming")
        self._alerts = ColumnDataSource(data=alert_markers(None, None, "", self._cds.data),
                                        name="candles_alerts")
        self._closed_only = CustomJSTransform(args={"source": self._cds}, v_func=_CLOSED_ONLY_JS)
        self._price_format = CustomJSHover(code=_PRICE_HOVER_JS)
        # One vertical cursor line shared by every figure's crosshair: it runs through all panes.
        self._cursor = Span(dimension="height", line_color=FLAT_COLOR, line_dash="dotted",
                            line_width=1)
        self._time_ticker, self._time_format = DatetimeTicker(), DatetimeTickFormatter()
        self._bar_width = 1.0

        price = self.price_figure = self._figure("price", 420, Range1d(0, 1))
        price.toolbar_location = "right"
        price.xaxis.visible = False
        price.yaxis.axis_label = "price"
        band = price.varea(x="time", y1=transform("bb_lower", self._closed_only),
                           y2=transform("bb_upper", self._closed_only), source=self._cds,
                           fill_color=_BB_COLOR, fill_alpha=0.08, name="candles_bb_band")
        price.segment(x0="time", y0="low", x1="time", y1="high", color="color",
                      line_dash="line_dash", source=self._cds, name="wicks")
        bodies = price.vbar(x="time", width=1, top="open", bottom="close", fill_color="color",
                            fill_alpha="fill_alpha", line_color="color", line_dash="line_dash",
                            source=self._cds, name="bodies")
        self.overlay_renderers: dict[str, list] = {}
        self._legend_items: dict[str, LegendItem] = {}
        for key, overlay in OVERLAYS.items():
            renderers = self._lines(price, overlay.lines)
            self.overlay_renderers[key] = renderers + ([band] if key == "bb" else [])
            self._legend_items[key] = LegendItem(label=overlay.label, renderers=renderers[:1])
        # A legend key only (one NaN bar, never drawn): its swatch shows how the forming bar looks.
        forming_key = price.vbar(x=[np.nan], width=1, top=[np.nan], bottom=[np.nan],
                                 fill_color=FLAT_COLOR, fill_alpha=FORMING_ALPHA,
                                 line_color=FLAT_COLOR, line_dash="dashed",
                                 name="candles_forming_key")
        price.add_layout(Legend(
            items=[*self._legend_items.values(),
                   LegendItem(label="forming bar (dashed)", renderers=[forming_key])],
            location="top_left", orientation="horizontal", click_policy="none",
            background_fill_alpha=0.6, border_line_alpha=0, label_text_font_size="8pt",
            glyph_width=16, glyph_height=12, spacing=6, padding=4, margin=4))
        markers = price.scatter(x="time", y="y", marker="marker", size=11, fill_color="color",
                                line_color="color", source=self._alerts,
                                name="candles_alert_marks")
        self._hover = HoverTool(renderers=[bodies], mode="vline", tooltips=self._tooltips(),
                                formatters=self._formatters())
        price.add_tools(self._hover, HoverTool(
            renderers=[markers], tooltips=[("alert", "@rule"), ("", "@message"),
                                           ("value", "@value{custom}"),
                                           ("fired", "@fired_at{%F %H:%M:%S}")],
            formatters={"@value": self._price_format, "@fired_at": "datetime"}))

        volume = self.volume_figure = self._figure("volume", 140, Range1d(0, 1), price.x_range)
        volume.yaxis.axis_label = "volume"
        volume.yaxis.formatter.use_scientific = False
        volumes = volume.vbar(x="time", width=1, top="volume", bottom=0, fill_color="color",
                              line_color="color", alpha=0.6, source=self._cds, name="volumes")
        self._bar_glyphs = [bodies.glyph, volumes.glyph]

        overlays = [[renderers[0], [line.column for line in OVERLAYS[key].lines]]
                    for key, renderers in self.overlay_renderers.items()]
        fit = self._fit_y_js = CustomJS(
            args={"source": self._cds, "x": price.x_range, "y": price.y_range,
                  "v": volume.y_range, "half": 0, "overlays": overlays, "panes": []},
            code=_FIT_Y_JS)
        price.x_range.js_on_change("start", fit)
        price.x_range.js_on_change("end", fit)
        for event in ("data", "streaming", "patching"):
            self._cds.js_on_change(event, fit)
        for renderer, _ in overlays:
            renderer.js_on_change("visible", fit)
        #: The indicator panes built so far (each is built the first time it is shown).
        self.pane_figures: dict[str, figure] = {}
        self._column = column(price, volume, sizing_mode="stretch_width")
        self._chart = pn.pane.Bokeh(self._column, sizing_mode="stretch_width")

    def _build_pane(self, key: str) -> figure:
        """Build the pane ``key`` below the others (its y range fitted to the bars shown)."""
        pane = PANES[key]
        fig = self._figure(f"candles_{key}_pane", PANE_HEIGHT,
                           Range1d(*(pane.y_range or (0, 1))), self.price_figure.x_range)
        fig.yaxis.axis_label = pane.label
        fig.yaxis.formatter.use_scientific = False
        if len(pane.guides) == 2:
            fig.add_layout(BoxAnnotation(bottom=pane.guides[0], top=pane.guides[1],
                                         fill_color=pane.lines[0].color, fill_alpha=0.06,
                                         line_alpha=0))
        for level in pane.guides:
            fig.add_layout(Span(location=level, dimension="width", line_color=FLAT_COLOR,
                                line_dash="dashed", line_alpha=0.7))
        hovered = self._lines(fig, pane.lines)[:1]
        if pane.histogram:
            bars = fig.vbar(x="time", width=self._bar_width, top=pane.histogram, bottom=0,
                            fill_color="hist_color", line_color="hist_color",
                            fill_alpha="fill_alpha", line_alpha="fill_alpha", source=self._cds,
                            name=f"candles_{pane.histogram}", level="underlay")
            self._bar_glyphs.append(bars.glyph)
            hovered = [bars]
        fig.add_tools(HoverTool(
            renderers=hovered, mode="vline", formatters=self._formatters(),
            tooltips=[("time", "@time{%F %H:%M} @phase"), *self._pane_tooltips(key)]))
        if pane.y_range is None:
            self._fit_pane(key, fig)
            args = self._fit_y_js.args
            self._fit_y_js.args = {**args, "panes": [*args["panes"], [fig, _pane_columns(pane)]]}
            fig.js_on_change("visible", self._fit_y_js)
        self.pane_figures[key] = fig
        self._column.children = [self.price_figure, self.volume_figure,
                                 *(self.pane_figures[k] for k in PANES if k in self.pane_figures)]
        return fig

    def _formatters(self) -> dict:
        """Return the hovers' formatters: prices and price-like indicators as traders read
        them (see :func:`format_price`), times as dates."""
        return {"@time": "datetime", **{f"@{c}": self._price_format for c in PRICE_COLUMNS}}

    def _pane_tooltips(self, key: str) -> list[tuple[str, str]]:
        pane = PANES[key]
        number = "custom" if pane.number == "price" else pane.number
        tips = [(line.label, f"@{line.column}{{{number}}}") for line in pane.lines]
        if pane.histogram:
            tips.append(("histogram", f"@{pane.histogram}{{{number}}}"))
        return tips

    def _tooltips(self) -> list[tuple[str, str]]:
        """Return the price hover's rows: the bar, then each indicator shown."""
        tips = [("time", "@time{%F %H:%M} @phase"),
                *((c, f"@{c}{{custom}}") for c in ("open", "high", "low", "close")),
                ("volume", "@volume{0,0.[00]}"), ("trades", "@trades{0,0}"),
                ("vwap", "@vwap{custom}")]
        for key, overlay in OVERLAYS.items():
            if key in self.overlays:
                tips += [(line.label, f"@{line.column}{{custom}}") for line in overlay.lines]
        for key in PANES:
            if key in self.panes:
                tips += self._pane_tooltips(key)
        return tips

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
        self._overlay_input = pn.widgets.CheckButtonGroup.from_param(
            self.param.overlays, name="", color="primary", variant="outline",
            css_classes=["tapeflow-overlays"])
        self._pane_input = pn.widgets.CheckButtonGroup.from_param(
            self.param.panes, name="", color="primary", variant="outline",
            css_classes=["tapeflow-panes"])
        self._toggles = pn.Row(self._overlay_input, pn.layout.HSpacer(), self._pane_input,
                               sizing_mode="stretch_width")

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

    # -- toggles ------------------------------------------------------------------------------

    @param.depends("overlays", watch=True)
    def _on_overlays(self) -> None:
        with pn.io.hold():
            self._show_overlays()
        self._push()

    @param.depends("panes", watch=True)
    def _on_panes(self) -> None:
        with pn.io.hold():
            self._show_panes()
        self._push()

    def _show_overlays(self) -> None:
        for key, renderers in self.overlay_renderers.items():
            shown = key in self.overlays
            for renderer in renderers:
                renderer.visible = shown
            self._legend_items[key].visible = shown
        self._hover.tooltips = self._tooltips()

    def _show_panes(self) -> None:
        for key in PANES:
            if key in self.panes and key not in self.pane_figures:
                self._build_pane(key)
        for key, fig in self.pane_figures.items():
            fig.visible = key in self.panes
        # The time axis goes under the lowest figure shown.
        below = [self.volume_figure, *(f for f in self.pane_figures.values() if f.visible)]
        for fig in (self.volume_figure, *self.pane_figures.values()):
            fig.xaxis.visible = fig is below[-1]
        self._hover.tooltips = self._tooltips()

    # -- live updates -------------------------------------------------------------------------

    @property
    def data(self) -> dict[str, np.ndarray]:
        """The columns the chart draws: ``time``, the bar fields, the indicators (as
        ``source.symbol_indicators`` gives them), ``provisional`` and the derived styles."""
        return self._cds.data

    @property
    def forming(self) -> dict[str, np.ndarray]:
        """The dashed last segments' columns: the last closed row and the forming row."""
        return self._forming.data

    @property
    def alerts(self) -> dict[str, np.ndarray]:
        """The alert markers' columns (see :func:`alert_markers`)."""
        return self._alerts.data

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
        data = _columns(bars, self._indicators(bars))
        self._poll_alerts()
        width = 0.8 * TIMEFRAMES[tf] / 1e6
        with pn.io.hold():
            self._bar_width = width
            for glyph in self._bar_glyphs:
                glyph.width = width
            self._fit_y_js.args = {**self._fit_y_js.args, "half": width / 2}
            self._cds.data = data
            self._forming.data = _forming_columns(data)
            self._place_alerts()
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
        with ``rollover=lookback``, the dashed forming segments and the alert markers follow;
        the figures, their ranges and the user's zoom are kept.
        """
        version = self.source.version()
        alerts_changed = self._poll_alerts()
        if version == self._seen_version:
            if not alerts_changed:
                return False
            with pn.io.hold():
                self._place_alerts()
            self._push()
            return True
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
            new = _columns(tail, self._indicators(tail))
            old = tail.index.values <= times[-1]
            self._patch(_take(new, old))
            self._stream(_take(new, ~old))
            self._sync_forming()
            self._place_alerts()
            self._update_quote()
        self._push()
        return True

    def _fetch(self, n: int) -> pd.DataFrame:
        if not self.state.symbol or self.state.timeframe not in self.source.timeframes():
            return empty_bars()
        return self.source.bars(self.state.timeframe, self.state.symbol, n=n)

    def _indicators(self, bars: pd.DataFrame) -> pd.DataFrame | None:
        """Return the symbol's indicators to line up with ``bars`` by time (None if the source
        has none). The whole window is asked for, so a bar added after ``bars`` were read
        cannot shift the rows; the flow computes it once per version for every session."""
        fetch = getattr(self.source, "symbol_indicators", None)
        if fetch is None or bars.empty:
            return None
        return fetch(self.state.timeframe, self.state.symbol)

    def _tail(self, last_shown: np.datetime64) -> pd.DataFrame:
        """Return the newest bars, enough of them to overlap the last bar shown."""
        n = TAIL_ROWS
        while True:
            tail = self._fetch(n)
            if len(tail) < n or tail.index[0] <= last_shown or n >= self.state.lookback:
                return tail
            n = min(4 * n, self.state.lookback)

    def _patch(self, new: dict[str, np.ndarray]) -> None:
        """Patch the cells of rows already shown whose values changed (NaN equals NaN)."""
        shown = self._cds.data
        times = shown["time"]
        if not len(new["time"]) or not len(times):
            return
        rows = np.searchsorted(times, new["time"])
        inside = rows < len(times)
        inside[inside] = times[rows[inside]] == new["time"][inside]  # older than the window: skip
        i, j = rows[inside], np.flatnonzero(inside)
        patches: dict[str, list[tuple[int, object]]] = {}
        for name, values in new.items():
            if name == "time":
                continue
            old, cur = np.asarray(shown[name])[i], values[j]
            changed = old != cur
            if cur.dtype.kind == "f":
                changed &= ~(np.isnan(old) & np.isnan(cur))
            for row, value in zip(i[changed], cur[changed]):
                patches.setdefault(name, []).append(
                    (int(row), value.item() if isinstance(value, np.generic) else value))
        if patches:
            self._cds.patch(patches)

    def _stream(self, new: dict[str, np.ndarray]) -> None:
        if not len(new["time"]):
            return
        follow = self.following
        before = _ms(self._cds.data["time"][-1:])[0]
        self._cds.stream(new, rollover=self.state.lookback)
        if follow and self._auto_x is not None:
            shift = _ms(new["time"][-1:])[0] - before
            self._set_x(self._auto_x[0] + shift, self._auto_x[1] + shift)

    def _sync_forming(self) -> None:
        new = _forming_columns(self._cds.data)
        if not all(_same(self._forming.data[c], v) for c, v in new.items()):
            self._forming.data = new

    def _poll_alerts(self) -> bool:
        """Re-read the fired alerts when the newest one changed; return whether it did."""
        fetch = getattr(self.source, "fired_alerts", None)
        if fetch is None:
            return False
        newest = fetch(1)
        which = [c for c in ("fired_at", "rule_id", "symbol", "time") if c in newest.columns]
        key = None if newest.empty else tuple(newest.iloc[0][which])
        if key == self._alerts_key:
            return False
        self._alerts_key = key
        self._fired = fetch(ALERT_ROWS)
        return True

    def _place_alerts(self) -> None:
        marks = alert_markers(self._fired, self.state.symbol, self.state.timeframe,
                              self._cds.data)
        if not all(_same(self._alerts.data[c], v) for c, v in marks.items()):
            self._alerts.data = marks

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
        for key, fig in self.pane_figures.items():
            self._fit_pane(key, fig)

    def _fit_pane(self, key: str, fig: figure) -> None:
        """Fit a pane without a fixed y range to all the rows held (the browser then fits it
        to the visible ones)."""
        pane = PANES[key]
        if pane.y_range is not None:
            return
        values = np.concatenate([self._cds.data[c] for c in _pane_columns(pane)])
        values = values[np.isfinite(values)]
        if len(values):
            lo, hi = float(values.min()), float(values.max())
            pad = (hi - lo) * 0.06 or abs(hi) * 0.01 or 1.0
            fig.y_range.update(start=lo - pad, end=hi + pad)

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
