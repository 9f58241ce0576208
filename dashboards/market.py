"""The market page: breadth over time, a sector heatmap of returns, movers and sectors.

Everything is drawn from a :class:`~dashboards.source.MarketSource` for ``state.timeframe``:

- **Breadth** (four Bokeh figures sharing one x range, fed by one ``ColumnDataSource``):
  advancers up / decliners down as bars, the A/D line, new highs up / new lows down, and the
  percent of symbols above their SMA 50 and SMA 200. Live ticks patch changed rows and stream
  new ones.
- **Heatmap**: one tile per symbol, grouped in sector rows, coloured on a diverging palette
  centred at 0 (grey where the return is unknown), labelled with the symbol and its return.
  Clicking a tile opens that symbol's candles. Live ticks patch the tiles whose values changed;
  the data is replaced only when the set of symbols changes.
- **Movers**: top gainers, top losers and most active (by volume) tables; clicking a row opens
  the symbol's candles. **Sectors**: the latest row's sector returns as bars.
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
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    DataTable,
    FactorRange,
    FixedTicker,
    HoverTool,
    NumberFormatter,
    Range1d,
    TableColumn,
    TapTool,
)
from bokeh.plotting import figure
from panel.io.state import set_curdoc

from dashboards.candles import DOWN_COLOR, FLAT_COLOR, UP_COLOR
from dashboards.source import HEATMAP_COLUMNS, MarketSource
from dashboards.state import AppState
from flows.schema import TIMEFRAMES

#: Diverging palette, strongest decline to strongest advance; the middle entry is "unchanged".
#: Mid-tone enough that white labels stay readable on every entry, in both themes.
PALETTE: tuple[str, ...] = (
    "#8e1b1b", "#a82424", "#bf3a31", "#cc5a50", "#b87570", "#6b6f7a",
    "#5e9a8d", "#3f9a87", "#268a7b", "#1b7366", "#0f5c50",
)
NEUTRAL_INDEX = len(PALETTE) // 2
#: Colour of a tile whose return is unknown (no reference close yet).
UNKNOWN_COLOR = "#9598a1"
#: Tiles per sector row at most (more symbols wrap onto further rows of the same sector).
MAX_COLUMNS = 16
#: Rows shown in each movers table.
TOP_N = 10
#: Breadth rows kept by the live charts.
BREADTH_ROWS = 1000

_BREADTH_COLUMNS = ("advancers", "decliners", "ad_line", "new_highs", "new_lows",
                    "pct_above_sma_50", "pct_above_sma_200")
_TILE_VALUES = ("return", "volume", "color", "pct")


def format_pct(value: float | None) -> str:
    """Return a signed percentage with a true minus sign (``—`` when unknown).

    Examples
    --------
    >>> format_pct(0.01234), format_pct(-0.5), format_pct(0.0), format_pct(float("nan"))
    ('+1.23%', '−50.00%', '0.00%', '—')
    """
    if value is None or not math.isfinite(value):
        return "—"
    sign = "+" if value > 0 else "−" if value < 0 else ""
    return f"{sign}{abs(value) * 100:.2f}%"


def return_colors(returns: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Return one palette colour per return: red below 0, green above, grey when unknown.

    The palette is centred at 0 and saturates at ``scale`` (default: the 90th percentile of the
    absolute returns, at least 0.5%). Any non-zero return gets a coloured entry, however small,
    so the sign is always visible.

    Examples
    --------
    >>> list(return_colors(np.array([-0.05, 0.0, 0.001, np.nan]), scale=0.05))
    ['#8e1b1b', '#6b6f7a', '#5e9a8d', '#9598a1']
    """
    returns = np.asarray(returns, dtype=float)
    known = np.isfinite(returns)
    if scale is None:
        scale = max(0.005, float(np.percentile(np.abs(returns[known]), 90)) if known.any()
                    else 0.005)
    steps = np.ceil(np.clip(np.abs(np.where(known, returns, 0.0)) / scale, 0, 1)
                    * NEUTRAL_INDEX).astype(int)
    index = NEUTRAL_INDEX + np.sign(np.where(known, returns, 0.0)).astype(int) * np.maximum(
        steps, (np.where(known, returns, 0.0) != 0).astype(int))
    colors = np.array(PALETTE, dtype=object)[index]
    colors[~known] = UNKNOWN_COLOR
    return colors


def heatmap_tiles(frame: pd.DataFrame, max_columns: int = MAX_COLUMNS) -> dict[str, np.ndarray]:
    """Lay out one tile per symbol, grouped in sector rows, and colour it by return.

    Sectors are in alphabetical order from the top, each starting a new row; a sector with more
    than ``max_columns`` symbols wraps onto further rows. Within a sector symbols are in
    alphabetical order, so the layout only moves when the set of symbols changes.

    Parameters
    ----------
    frame : DataFrame
        ``symbol sector name return volume`` (a :meth:`MarketSource.heatmap`).
    max_columns : int
        Most tiles per row.

    Returns
    -------
    dict of column name to array
        ``x y`` (tile centres; ``y`` grows downwards as negative numbers), ``symbol sector name
        return volume``, ``color`` and ``pct`` (the return label).

    Examples
    --------
    >>> f = pd.DataFrame({"symbol": ["B", "A", "C"], "sector": ["Tech", "Tech", "Energy"],
    ...                   "name": "", "return": [0.01, -0.02, np.nan], "volume": 1.0})
    >>> t = heatmap_tiles(f)
    >>> list(t["symbol"]), t["y"].tolist(), list(t["pct"])
    (['C', 'A', 'B'], [-0.5, -1.5, -1.5], ['—', '−2.00%', '+1.00%'])
    """
    frame = frame.loc[:, list(HEATMAP_COLUMNS)].copy()
    frame["sector"] = frame["sector"].fillna("Unknown").astype(str).replace("", "Unknown")
    frame = frame.sort_values(["sector", "symbol"], kind="stable").reset_index(drop=True)
    sizes = frame.groupby("sector", sort=True).size()
    width = int(min(max_columns, max(4, sizes.max() if len(sizes) else 4)))
    x, y, row = [], [], 0
    for size in sizes:
        for i in range(size):
            x.append(i % width + 0.5)
            y.append(-(row + i // width) - 0.5)
        row += math.ceil(size / width)
    # Writable copies: pandas hands out read-only views, which ColumnDataSource.patch cannot edit.
    returns = np.array(frame["return"].to_numpy(dtype=float), copy=True)
    return {
        "x": np.array(x, dtype=float), "y": np.array(y, dtype=float),
        "symbol": np.array(frame["symbol"].astype(str).tolist(), dtype=object),
        "sector": np.array(frame["sector"].tolist(), dtype=object),
        "name": np.array(frame["name"].fillna("").astype(str).tolist(), dtype=object),
        "return": returns,
        "volume": np.array(frame["volume"].to_numpy(dtype=float), copy=True),
        "color": return_colors(returns),
        "pct": np.array([format_pct(r) for r in returns], dtype=object),
    }


def _sector_labels(tiles: dict[str, np.ndarray]) -> dict[float, str]:
    """Return the sector name to show at the y of each sector's first row of tiles."""
    labels: dict[float, str] = {}
    for sector, y in zip(tiles["sector"], tiles["y"]):
        if str(sector) not in labels.values():
            labels[float(y)] = str(sector)
    return labels


def movers(frame: pd.DataFrame, n: int = TOP_N) -> dict[str, pd.DataFrame]:
    """Return the ``gainers``, ``losers`` (by return) and ``active`` (by volume) tables.

    Symbols with an unknown return are left out of gainers and losers, and a symbol appears
    among the gainers only with a positive return (losers: negative).

    Examples
    --------
    >>> f = pd.DataFrame({"symbol": list("ABC"), "sector": "S", "name": "",
    ...                   "return": [0.02, -0.01, 0.03], "volume": [5.0, 9.0, 1.0]})
    >>> t = movers(f)
    >>> list(t["gainers"].symbol), list(t["losers"].symbol), list(t["active"].symbol)
    (['C', 'A'], ['B'], ['B', 'A', 'C'])
    """
    cols = ["symbol", "name", "sector", "return", "volume"]
    frame = frame.loc[:, cols]
    known = frame[np.isfinite(frame["return"].to_numpy(dtype=float))]
    gainers = known[known["return"] > 0].sort_values("return", ascending=False, kind="stable")
    losers = known[known["return"] < 0].sort_values("return", ascending=True, kind="stable")
    active = frame.sort_values("volume", ascending=False, kind="stable")
    return {key: table.head(n).reset_index(drop=True)
            for key, table in (("gainers", gainers), ("losers", losers), ("active", active))}


_TABLE_FIELDS = ("symbol", "name", "sector", "return", "volume")


def _table_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return a movers table's columns (writable arrays)."""
    return {k: np.array(frame[k].tolist(), dtype=object if k in ("symbol", "name", "sector")
                        else float) for k in _TABLE_FIELDS}


def _breadth_columns(ds) -> dict[str, np.ndarray]:
    """Return the breadth chart's columns (decliners and new lows negated, drawn downwards)."""
    data = {"time": np.array(ds["time"].values, dtype="datetime64[ns]", copy=True)}
    for name in _BREADTH_COLUMNS:
        values = np.array(ds[name].values, dtype=float, copy=True) if name in ds else \
            np.full(len(data["time"]), np.nan)
        data[name] = -values if name in ("decliners", "new_lows") else values
    return data


def _sector_columns(ds) -> dict[str, np.ndarray]:
    """Return the sector chart's columns from the latest row, best sector on top."""
    if ds.sizes.get("time", 0) == 0 or ds.sizes.get("sector", 0) == 0:
        return {k: np.array([], dtype=object if k in ("sector", "color", "pct") else float)
                for k in ("sector", "return", "return_vw", "advancers", "decliners", "volume",
                          "color", "pct", "bar")}
    last = ds.isel(time=-1)
    frame = pd.DataFrame({
        "sector": np.array(last["sector"].values, dtype=object),
        **{k: np.array(last[k].values, dtype=float) for k in
           ("return", "return_vw", "advancers", "decliners", "volume") if k in last},
    })
    frame = frame.sort_values("return", ascending=True, na_position="first", kind="stable")
    r = frame["return"].to_numpy(dtype=float)
    out = {k: frame[k].to_numpy() for k in frame.columns}
    out["bar"] = np.where(np.isfinite(r), r * 100, 0.0)
    out["color"] = np.where(~np.isfinite(r), UNKNOWN_COLOR,
                            np.where(r > 0, UP_COLOR, np.where(r < 0, DOWN_COLOR, FLAT_COLOR)))
    out["pct"] = np.array([format_pct(v) for v in r], dtype=object)
    return out


class MarketView(PeriodicRefresh, pn.viewable.Viewer):
    """Breadth, a sector heatmap, movers and sector performance for ``state.timeframe``.

    Parameters
    ----------
    state : AppState
        The timeframe shown; clicking a tile or a mover sets ``symbol`` and ``page="candles"``.
    source : MarketSource
        Where breadth, sectors and the heatmap come from.

    Notes
    -----
    Showing the view starts one periodic callback (``period`` ms) for the session, stopped when
    the session is destroyed (or by :meth:`stop`, e.g. when the app shows another page). A tick
    costs one ``source.version()`` call when nothing changed.

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> src = FrameSource.synthetic(["AAA", "BBB", "CCC"], n_bars=30)
    >>> view = MarketView(AppState.from_source(src), src)
    >>> sorted(view.tiles["symbol"]), len(view.breadth_data["time"])
    (['AAA', 'BBB', 'CCC'], 30)
    """

    state = param.ClassSelector(class_=AppState, doc="The session's app state.")

    source = param.Parameter(doc="The MarketSource read.")

    draw_on_start = True  # draw at once, then refresh periodically

    period = param.Integer(default=2000, bounds=(50, None), doc="""
        Milliseconds between checks of ``source.version()``.""")

    def __init__(self, state: AppState | None = None, source: MarketSource | None = None,
                 **params):
        if source is None:
            raise TypeError("MarketView needs a source")
        if state is None:
            state = AppState.from_source(source)
        super().__init__(state=state, source=source, **params)
        self._seen_version: int | None = None
        self._callback: pn.io.PeriodicCallback | None = None
        self._build_breadth()
        self._build_heatmap()
        self._build_sectors()
        self._build_tables()
        self._tf_input = pn.widgets.RadioButtonGroup(
            options=list(self.source.timeframes()) or [self.state.timeframe],
            value=self.state.timeframe, css_classes=["tapeflow-tf"])
        self._tf_input.param.watch(self._on_tf_input, "value")
        self._summary = pn.pane.HTML("", css_classes=["tapeflow-summary"], min_width=400)
        self._layout = pn.Column(
            pn.Row(self._tf_input, self._summary, sizing_mode="stretch_width"),
            pn.Row(pn.Column(pn.pane.HTML("<b>Sector heatmap</b> · return against the previous "
                                          "close; click a tile for its candles"),
                             self._heatmap_pane, sizing_mode="stretch_width"),
                   pn.Column(self._tables, width=480), sizing_mode="stretch_width"),
            pn.Row(pn.Column(pn.pane.HTML("<b>Breadth</b>"), self._breadth_pane,
                             sizing_mode="stretch_width"),
                   pn.Column(pn.pane.HTML("<b>Sectors</b> · latest return"),
                             self._sector_pane, width=480),
                   sizing_mode="stretch_width"),
            sizing_mode="stretch_width", css_classes=["tapeflow-market"],
        )
        self.reload()

    # -- construction -------------------------------------------------------------------------

    def _build_breadth(self) -> None:
        self._breadth = ColumnDataSource(_breadth_columns(_EMPTY_BREADTH), name="breadth")
        x_range = DataRange1d(range_padding=0.02)
        common = {"x_axis_type": "datetime", "x_range": x_range, "sizing_mode": "stretch_width",
                  "tools": "xpan,xwheel_zoom,reset,save", "active_drag": "xpan",
                  "active_scroll": "xwheel_zoom", "min_border_left": 60,
                  "toolbar_location": "right"}
        ad = figure(name="breadth_ad", height=170, title="advancers (up) / decliners (down)", **common)
        self._breadth_bars = [
            ad.vbar(x="time", top="advancers", bottom=0, width=1, color=UP_COLOR,
                    source=self._breadth),
            ad.vbar(x="time", top="decliners", bottom=0, width=1, color=DOWN_COLOR,
                    source=self._breadth),
        ]
        line = figure(name="breadth_line", height=130, title="A/D line", **common)
        line.line(x="time", y="ad_line", source=self._breadth, line_width=2, color="#2962ff")
        hl = figure(name="breadth_highs", height=130, title="new 20-bar highs (up) / lows (down)", **common)
        self._breadth_bars += [
            hl.vbar(x="time", top="new_highs", bottom=0, width=1, color=UP_COLOR,
                    source=self._breadth),
            hl.vbar(x="time", top="new_lows", bottom=0, width=1, color=DOWN_COLOR,
                    source=self._breadth),
        ]
        pct = figure(name="breadth_pct", height=150, title="% above SMA", y_range=Range1d(0, 100),
                     **common)
        pct.line(x="time", y="pct_above_sma_50", source=self._breadth, line_width=2,
                 color="#ff9800", legend_label="SMA 50")
        pct.line(x="time", y="pct_above_sma_200", source=self._breadth, line_width=2,
                 color="#ab47bc", legend_label="SMA 200")
        for fig in (ad, line, hl, pct):
            if fig.legend:
                fig.legend.location = "top_left"
                fig.legend.orientation = "horizontal"
                fig.legend.background_fill_alpha = 0.4
                fig.legend.label_text_font_size = "8pt"
                fig.legend.padding = fig.legend.margin = 2
            fig.add_tools(HoverTool(mode="vline", tooltips=[
                ("time", "@time{%F %H:%M}"), ("advancers", "@advancers"),
                ("decliners", "@decliners{0}"), ("A/D line", "@ad_line"),
                ("% > SMA 50", "@pct_above_sma_50{0.0}"),
                ("% > SMA 200", "@pct_above_sma_200{0.0}")],
                formatters={"@time": "datetime"}, renderers=fig.renderers[:1]))
        for fig in (ad, line, hl):
            fig.xaxis.visible = False
        self.breadth_figures = (ad, line, hl, pct)
        self._breadth_pane = pn.pane.Bokeh(column(*self.breadth_figures,
                                                  sizing_mode="stretch_width"),
                                           sizing_mode="stretch_width")

    def _build_heatmap(self) -> None:
        empty = heatmap_tiles(pd.DataFrame(columns=list(HEATMAP_COLUMNS)))
        self._tiles = ColumnDataSource(empty, name="heatmap")
        fig = figure(name="heatmap_figure", height=300, sizing_mode="stretch_width",
                     x_range=Range1d(0, 4), y_range=Range1d(-1, 0),
                     tools="save", toolbar_location=None, min_border=4)
        fig.xaxis.visible = False
        # Sector names are the y axis' labels, one at each sector's first row of tiles.
        fig.yaxis.ticker = FixedTicker(ticks=[])
        fig.yaxis.major_label_overrides = {}
        fig.yaxis.axis_line_color = None
        fig.yaxis.major_tick_line_color = None
        fig.yaxis.minor_tick_line_color = None
        fig.yaxis.major_label_text_font_size = "9pt"
        fig.grid.visible = False
        fig.outline_line_color = None
        tiles = fig.rect(x="x", y="y", width=0.96, height=0.94, fill_color="color",
                         line_color=None, source=self._tiles, name="tiles")
        tiles.nonselection_glyph = None
        tiles.selection_glyph = None
        fig.text(x="x", y="y", text="symbol", source=self._tiles, text_color="white",
                 text_font_size="9pt", text_font_style="bold", text_align="center",
                 text_baseline="bottom", y_offset=1)
        fig.text(x="x", y="y", text="pct", source=self._tiles, text_color="white",
                 text_font_size="8pt", text_align="center", text_baseline="top", y_offset=2)
        fig.add_tools(TapTool(renderers=[tiles]), HoverTool(renderers=[tiles], tooltips=[
            ("symbol", "@symbol"), ("name", "@name"), ("sector", "@sector"),
            ("return", "@pct"), ("volume", "@volume{0,0}")]))
        self._tiles.selected.on_change("indices", self._on_tile_selected)
        self.heatmap_figure = fig
        self._heatmap_pane = pn.pane.Bokeh(fig, sizing_mode="stretch_width")

    def _build_sectors(self) -> None:
        self._sectors = ColumnDataSource(_sector_columns(_EMPTY_SECTORS), name="sectors")
        fig = figure(name="sector_figure", height=300, width=460, y_range=FactorRange(),
                     tools="save", toolbar_location=None, x_axis_label="return %",
                     min_border_left=10)
        fig.hbar(y="sector", right="bar", left=0, height=0.7, color="color",
                 source=self._sectors)
        fig.add_tools(HoverTool(tooltips=[
            ("sector", "@sector"), ("return", "@pct"), ("advancers", "@advancers{0}"),
            ("decliners", "@decliners{0}"), ("volume", "@volume{0,0}")]))
        fig.ygrid.visible = False
        self.sector_figure = fig
        self._sector_pane = pn.pane.Bokeh(fig, width=470)

    def _build_tables(self) -> None:
        # Bokeh DataTables: offline, and a tapped row selects like a tapped tile does.
        empty = movers(pd.DataFrame(columns=list(HEATMAP_COLUMNS)))
        columns = [
            TableColumn(field="symbol", title="symbol", width=70),
            TableColumn(field="name", title="name", width=170),
            TableColumn(field="return", title="return", width=70,
                        formatter=NumberFormatter(format="+0.00%", text_align="right")),
            TableColumn(field="volume", title="volume", width=100,
                        formatter=NumberFormatter(format="0,0", text_align="right")),
        ]
        self._movers = {key: ColumnDataSource(_table_columns(frame), name=f"movers_{key}")
                        for key, frame in empty.items()}
        labels = {"gainers": "Top gainers", "losers": "Top losers", "active": "Most active"}
        tabs = []
        for key, cds in self._movers.items():
            table = DataTable(source=cds, columns=columns, index_position=None, height=330,
                              sizing_mode="stretch_width", sortable=False, reorderable=False,
                              name=f"table_{key}")
            cds.selected.on_change("indices", lambda attr, old, new, key=key:
                                   self._on_row_selected(key, new))
            tabs.append((labels[key], pn.pane.Bokeh(table, sizing_mode="stretch_width")))
        self._tables = pn.Tabs(*tabs, sizing_mode="stretch_width")

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """The movers tables shown: ``gainers``, ``losers`` and ``active``."""
        return {key: pd.DataFrame({k: cds.data[k] for k in _TABLE_FIELDS})
                for key, cds in self._movers.items()}

    def __panel__(self) -> pn.viewable.Viewable:
        self.start()
        return self._layout

    # -- opening a symbol ---------------------------------------------------------------------

    def open_symbol(self, symbol: str) -> None:
        """Show ``symbol`` on the candles page (sets ``state.symbol`` and ``state.page``)."""
        self.state.param.update(symbol=symbol, page="candles")

    def _on_tile_selected(self, attr: str, old: list[int], new: list[int]) -> None:
        self._open_selected(self._tiles, new)

    def _on_row_selected(self, key: str, new: list[int]) -> None:
        self._open_selected(self._movers[key], new)

    def _open_selected(self, cds: ColumnDataSource, new: list[int]) -> None:
        """Open the symbol of the selected row of ``cds`` (a tap on a tile or table row)."""
        if not new:
            return
        symbols = cds.data["symbol"]
        index = int(new[0])
        cds.selected.indices = []  # so clicking the same one again opens it again
        if not 0 <= index < len(symbols):
            return
        symbol = str(symbols[index])
        # A Bokeh callback runs inside Bokeh's handling of the browser's change: run the page
        # switch on the next tick, in the session's context, as Panel's own callbacks run.
        doc = cds.document
        if doc is not None and doc.session_context is not None:
            with set_curdoc(doc):
                pn.state.execute(lambda: self.open_symbol(symbol), schedule=True)
        else:
            self.open_symbol(symbol)

    def _on_tf_input(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.state.timeframe:
            self.state.timeframe = event.new

    # -- live updates -------------------------------------------------------------------------


    @property
    def tiles(self) -> dict[str, np.ndarray]:
        """The heatmap's columns (see :func:`heatmap_tiles`)."""
        return self._tiles.data

    @property
    def breadth_data(self) -> dict[str, np.ndarray]:
        """The breadth charts' columns (decliners and new lows negated)."""
        return self._breadth.data

    @property
    def sector_data(self) -> dict[str, np.ndarray]:
        """The sector chart's columns, best sector last (drawn on top)."""
        return self._sectors.data

    @param.depends("state.timeframe", watch=True)
    def _on_state(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Replace every chart's data for ``state.timeframe``."""
        tf = self.state.timeframe
        self._seen_version = self.source.version()
        width = 0.8 * TIMEFRAMES.get(tf, TIMEFRAMES["1m"]) / 1e6
        for renderer in self._breadth_bars:
            renderer.glyph.width = width
        if self._tf_input.value != tf:
            self._tf_input.value = tf
        # A widget's callback may run without the document lock: hold the model changes and
        # send them together (see dashboards/alerts.py).
        with pn.io.hold():
            self._breadth.data = _own(self._shared("breadth"))
            self._set_tiles(replace=True)
            self._update_sectors()
            self._update_summary()

    def refresh(self) -> bool:
        """Apply what changed in the source since the last call; return whether anything did.

        Breadth rows are patched (changed values) and streamed (new rows); heatmap tiles are
        patched; the small tables and the sector bars get new data. No figure is rebuilt.
        """
        version = self.source.version()
        if version == self._seen_version:
            return False
        self._seen_version = version
        with pn.io.hold():  # one message for the tick's changes, not one per change
            self._update_breadth(self._shared("breadth"))
            self._set_tiles()
            self._update_sectors()
            self._update_summary()
        return True

    def _shared(self, what: str):
        """The columns of ``what`` (``breadth``, ``tiles``, ``movers``, ``sectors``) for
        ``state.timeframe``: derived once per source version for every session when the
        source has a cache (a flow does), so twenty open pages cost one derivation. Shared:
        never change them in place (:func:`_own` copies them for a source that is patched).
        """
        def make():
            if what == "breadth":
                return _breadth_columns(self._fetch("breadth"))
            if what == "sectors":
                return _sector_columns(self._fetch("sectors"))
            frame = self._fetch("heatmap")
            return {"tiles": heatmap_tiles(frame),
                    "movers": {k: _table_columns(t) for k, t in movers(frame).items()}}

        cache = getattr(self.source, "cache", None)
        key = "heatmap" if what in ("tiles", "movers") else what
        value = make() if cache is None else cache.get_or_compute(
            ("market-view", key, self.state.timeframe, self.source.version()), make)
        return value[what] if key == "heatmap" else value

    def _fetch(self, what: str):
        tf = self.state.timeframe
        if tf not in self.source.timeframes():
            return (pd.DataFrame(columns=list(HEATMAP_COLUMNS)) if what == "heatmap"
                    else _EMPTY_BREADTH if what == "breadth" else _EMPTY_SECTORS)
        return getattr(self.source, what)(tf)

    def _update_breadth(self, new: dict[str, np.ndarray]) -> None:
        shown = self._breadth.data
        old_t, new_t = shown["time"], new["time"]
        if len(old_t) == 0 or len(new_t) == 0:
            self._breadth.data = _own(new)
            return
        overlap_new = new_t[new_t <= old_t[-1]]
        overlap_old = old_t[old_t >= new_t[0]]
        if not np.array_equal(overlap_new, overlap_old):  # a row appeared in the middle
            self._breadth.data = _own(new)
            return
        offset = len(old_t) - len(overlap_old)
        patches: dict[str, list[tuple[int, float]]] = {}
        for name in _BREADTH_COLUMNS:
            a, b = shown[name][offset:], new[name][: len(overlap_new)]
            changed = np.flatnonzero(~((a == b) | (np.isnan(a) & np.isnan(b))))
            if len(changed):
                patches[name] = [(int(offset + i), float(b[i])) for i in changed]
        if patches:
            self._breadth.patch(patches)
        tail = slice(len(overlap_new), None)
        if len(new_t) > len(overlap_new):
            self._breadth.stream({k: v[tail] for k, v in new.items()}, rollover=BREADTH_ROWS)

    def _set_tiles(self, replace: bool = False) -> None:
        tiles = self._shared("tiles")
        shown = self._tiles.data
        same = (not replace and len(shown["symbol"]) == len(tiles["symbol"])
                and np.array_equal(shown["symbol"], tiles["symbol"])
                and np.array_equal(shown["y"], tiles["y"]))
        if same:
            patches: dict[str, list[tuple[int, object]]] = {}
            for name in _TILE_VALUES:
                a, b = shown[name], tiles[name]
                for i in range(len(b)):
                    if not (a[i] == b[i] or (isinstance(b[i], float) and math.isnan(b[i])
                                             and math.isnan(a[i]))):
                        patches.setdefault(name, []).append((i, b[i]))
            if patches:
                self._tiles.patch(patches)
        else:
            self._tiles.data = _own(tiles)
            labels = _sector_labels(tiles)
            self.heatmap_figure.yaxis.ticker.ticks = list(labels)
            self.heatmap_figure.yaxis.major_label_overrides = labels
            rows = round(-float(tiles["y"].min()) + 0.5) if len(tiles["y"]) else 1
            columns = float(tiles["x"].max() + 0.5) if len(tiles["x"]) else 4.0
            self.heatmap_figure.x_range.update(start=0, end=columns)
            self.heatmap_figure.y_range.update(start=-rows, end=0)
            self.heatmap_figure.height = max(120, 36 * rows + 10)
        for key, data in self._shared("movers").items():
            shown = self._movers[key].data
            if not all(np.array_equal(shown[k], data[k]) for k in _TABLE_FIELDS):
                self._movers[key].data = data

    def _update_sectors(self) -> None:
        data = self._shared("sectors")
        factors = [str(s) for s in data["sector"]]
        if list(self.sector_figure.y_range.factors) != factors:
            self.sector_figure.y_range.factors = factors
        self._sectors.data = data

    def _update_summary(self) -> None:
        data = self._breadth.data
        if len(data["time"]) == 0:
            self._summary.object = '<span class="tf-muted">No breadth yet: waiting for bars.</span>'
            return
        adv, dec = data["advancers"][-1], -data["decliners"][-1]
        known = np.isfinite(self._tiles.data["return"])
        note = ("" if known.any() or not len(known) else
                " · returns appear once symbols have a previous session close")
        ad_line = data["ad_line"][-1]
        self._summary.object = (
            f'<span style="color:{UP_COLOR};font-weight:600">▲ {_int(adv)}</span> '
            f'<span style="color:{DOWN_COLOR};font-weight:600">▼ {_int(dec)}</span> '
            f"· A/D line {_int(ad_line)} · {len(self._tiles.data['symbol'])} symbols"
            f'<span class="tf-muted">{html.escape(note)}</span>')


def _own(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of shared columns, for a data source that is later patched in place."""
    return {k: np.array(v, copy=True) for k, v in columns.items()}


def _int(value: float) -> str:
    return f"{int(value):,}" if math.isfinite(value) else "—"


def _empty_datasets():
    import xarray as xr

    time = np.empty(0, "datetime64[ns]")
    breadth = xr.Dataset({k: ("time", np.empty(0)) for k in _BREADTH_COLUMNS},
                         coords={"time": time})
    sectors = xr.Dataset({k: (("time", "sector"), np.empty((0, 0)))
                          for k in ("return", "return_vw", "advancers", "decliners", "volume")},
                         coords={"time": time, "sector": np.array([], dtype=object)})
    return breadth, sectors


_EMPTY_BREADTH, _EMPTY_SECTORS = _empty_datasets()
