"""The market and monitor pages and the multi-page app without a browser: what they would draw,
what a click does, and how live updates reach the figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import panel as pn
import pytest
from bokeh.document import Document

from dashboards.app import App, create_app
from dashboards.market import (
    NEUTRAL_INDEX,
    PALETTE,
    UNKNOWN_COLOR,
    MarketView,
    format_pct,
    heatmap_tiles,
    movers,
    return_colors,
)
from dashboards.monitor import SERIES, MonitorCollector, MonitorView, format_bytes
from dashboards.source import (
    BREADTH_VARIABLES,
    HEATMAP_COLUMNS,
    SECTOR_VARIABLES,
    FrameSource,
    MarketSource,
)
from dashboards.state import PAGES, AppState
from flows.cache import Cache, CacheConfig

UP = set(PALETTE[NEUTRAL_INDEX + 1:])
DOWN = set(PALETTE[:NEUTRAL_INDEX])


@pytest.fixture
def source() -> FrameSource:
    return FrameSource.synthetic(12, n_bars=80)


@pytest.fixture
def market(source: FrameSource) -> MarketView:
    return MarketView(AppState.from_source(source), source)


def record_events(*models) -> list[tuple[str, str]]:
    """Return a list collecting (event, model name) for changes to ``models``' documents."""
    events: list[tuple[str, str]] = []
    doc = Document()
    for model in models:
        doc.add_root(model)
    doc.on_change(lambda e: events.append((type(e).__name__, getattr(e.model, "name", None)
                                           or type(e.model).__name__)))
    return events


def next_bar(source: FrameSource, rng: np.random.Generator) -> None:
    source.tick(rng, new_bar=True)


# -- the source --------------------------------------------------------------------------------


def test_frame_source_serves_market_analytics_in_the_flow_shapes(source: FrameSource) -> None:
    assert isinstance(source, MarketSource)
    breadth, sectors, heat = source.breadth("1m"), source.sectors("1m"), source.heatmap("1m")

    assert set(breadth.data_vars) == set(BREADTH_VARIABLES) and breadth.sizes["time"] == 80
    assert set(sectors.data_vars) == set(SECTOR_VARIABLES)
    assert dict(sectors.sizes) == {"time": 80, "sector": 4}
    assert list(heat.columns) == list(HEATMAP_COLUMNS) and len(heat) == 12
    assert "provisional" in source.indicators("1m")
    # Consistent: the last breadth row counts the heatmap's signs, sectors agree with both.
    assert int(breadth["advancers"][-1]) == int((heat["return"] > 0).sum())
    assert int(breadth["decliners"][-1]) == int((heat["return"] < 0).sum())
    tech = heat[heat["sector"] == "Technology"]["return"]
    assert float(sectors["return"].sel(sector="Technology")[-1]) == pytest.approx(tech.mean())
    assert int(breadth["ad_line"][-1]) == int((breadth["advancers"] - breadth["decliners"]).sum())
    assert set(source.monitor()) >= {"received", "flush_ms_p50", "flush_ms_p99", "last_flush",
                                     "store_bytes"}


# -- heatmap -----------------------------------------------------------------------------------


def test_heatmap_has_one_tile_per_symbol_grouped_by_sector(market: MarketView,
                                                            source: FrameSource) -> None:
    tiles = market.tiles

    assert sorted(tiles["symbol"]) == sorted(source.symbols())
    assert len(set(zip(tiles["x"], tiles["y"]))) == len(tiles["symbol"])  # no overlap
    for sector in set(tiles["sector"]):  # a sector's tiles are consecutive rows of its own
        rows = set(tiles["y"][tiles["sector"] == sector])
        others = set(tiles["y"][tiles["sector"] != sector])
        assert not rows & others
    assert list(tiles["sector"]) == sorted(tiles["sector"])
    # The axis names each sector once, at its first row.
    labels = market.heatmap_figure.yaxis.major_label_overrides
    assert sorted(labels.values()) == sorted(set(tiles["sector"]))


def test_heatmap_colours_by_sign_centred_at_zero(market: MarketView) -> None:
    tiles = market.tiles
    r, colors = tiles["return"], tiles["color"]

    assert (r > 0).any() and (r < 0).any()
    assert all(c in UP for c in colors[r > 0]) and all(c in DOWN for c in colors[r < 0])
    assert list(tiles["pct"]) == [format_pct(v) for v in r]
    # Tiny moves still show their sign; unknown returns are grey; stronger moves are darker.
    assert list(return_colors(np.array([1e-9, -1e-9, 0.0, np.nan]), scale=0.01)) == [
        PALETTE[NEUTRAL_INDEX + 1], PALETTE[NEUTRAL_INDEX - 1], PALETTE[NEUTRAL_INDEX],
        UNKNOWN_COLOR]
    assert list(return_colors(np.array([0.02, -0.02]), scale=0.01)) == [PALETTE[-1], PALETTE[0]]


def test_unknown_returns_are_grey_tiles_left_out_of_movers() -> None:
    frame = pd.DataFrame({"symbol": ["A", "B"], "sector": ["S", None], "name": "",
                          "return": [np.nan, 0.01], "volume": [5.0, 1.0]})
    tiles = heatmap_tiles(frame)
    table = movers(frame)

    assert list(tiles["sector"]) == ["S", "Unknown"] and tiles["color"][0] == UNKNOWN_COLOR
    assert list(table["gainers"]["symbol"]) == ["B"] and table["losers"].empty
    assert list(table["active"]["symbol"]) == ["A", "B"]


def test_clicking_a_tile_opens_its_candles(market: MarketView) -> None:
    state = market.state
    state.page = "market"
    index = int(np.flatnonzero(market.tiles["symbol"] == "SYM07")[0])

    market._tiles.selected.indices = [index]  # what a tap in the browser syncs

    assert (state.symbol, state.page) == ("SYM07", "candles")
    assert market._tiles.selected.indices == []  # the same tile can be clicked again


def test_clicking_a_mover_opens_its_candles(market: MarketView) -> None:
    second = market.tables["losers"]["symbol"].iloc[1]

    market._movers["losers"].selected.indices = [1]  # a tapped table row

    assert (market.state.symbol, market.state.page) == (second, "candles")


# -- movers and sectors ------------------------------------------------------------------------


def test_top_movers_are_sorted(market: MarketView, source: FrameSource) -> None:
    heat = source.heatmap("1m")
    gainers = market.tables["gainers"]
    losers = market.tables["losers"]
    active = market.tables["active"]

    assert list(gainers["symbol"]) == list(
        heat[heat["return"] > 0].nlargest(10, "return")["symbol"])
    assert gainers["return"].is_monotonic_decreasing and (gainers["return"] > 0).all()
    assert losers["return"].is_monotonic_increasing and (losers["return"] < 0).all()
    assert list(active["symbol"]) == list(heat.nlargest(10, "volume")["symbol"])


def test_sector_bars_show_the_latest_row(market: MarketView, source: FrameSource) -> None:
    last = source.sectors("1m").isel(time=-1)
    data = market.sector_data

    assert list(market.sector_figure.y_range.factors) == list(data["sector"])
    for sector, bar in zip(data["sector"], data["bar"]):
        assert bar == pytest.approx(100 * float(last["return"].sel(sector=sector)))
    assert list(data["bar"]) == sorted(data["bar"])  # best sector drawn on top


def test_breadth_charts_draw_the_breadth(market: MarketView, source: FrameSource) -> None:
    breadth = source.breadth("1m")
    data = market.breadth_data

    np.testing.assert_array_equal(data["time"], breadth["time"].values)
    np.testing.assert_array_equal(data["advancers"], breadth["advancers"].values)
    np.testing.assert_array_equal(-data["decliners"], breadth["decliners"].values)
    ranges = {fig.x_range for fig in market.breadth_figures}
    assert len(ranges) == 1  # one shared x range


# -- live updates ------------------------------------------------------------------------------


def test_live_update_streams_and_patches_without_new_figures(market: MarketView,
                                                             source: FrameSource) -> None:
    figures = (market.heatmap_figure, market.sector_figure, *market.breadth_figures)
    sources = (market._breadth, market._tiles)
    events = record_events(market._breadth_pane.object, market.heatmap_figure)
    rng = np.random.default_rng(1)

    source.tick(rng)  # the forming bar moves: breadth and tiles are patched
    assert market.refresh()
    kinds = {(kind, name) for kind, name in events}
    assert ("ColumnsPatchedEvent", "heatmap") in kinds
    assert not any(kind == "ColumnDataChangedEvent" for kind, _ in events)

    events.clear()
    next_bar(source, rng)  # a new bar: one breadth row streamed
    assert market.refresh()
    assert ("ColumnsStreamedEvent", "breadth") in set(events)
    assert not any(kind == "ColumnDataChangedEvent" for kind, _ in events)

    assert (market.heatmap_figure, market.sector_figure, *market.breadth_figures) == figures
    assert (market._breadth, market._tiles) == sources
    breadth = source.breadth("1m")
    np.testing.assert_array_equal(market.breadth_data["time"], breadth["time"].values)
    np.testing.assert_array_equal(market.breadth_data["ad_line"], breadth["ad_line"].values)
    np.testing.assert_array_equal(market.tiles["return"],
                                  heatmap_tiles(source.heatmap("1m"))["return"])
    assert not market.refresh()  # nothing new: one version() call, nothing sent


def test_a_new_symbol_relays_the_heatmap(market: MarketView, source: FrameSource) -> None:
    last = source.bars("1m", "SYM00", n=1)
    source.upsert("1m", "ZNEW", last)

    assert market.refresh()

    assert "ZNEW" in set(market.tiles["symbol"]) and len(market.tiles["symbol"]) == 13


def test_timeframe_change_replaces_the_data(market: MarketView, source: FrameSource) -> None:
    market.state.timeframe = "5m"

    np.testing.assert_array_equal(market.breadth_data["time"],
                                  source.breadth("5m")["time"].values)
    assert market._tf_input.value == "5m"


def test_one_periodic_callback_per_market_view(market: MarketView) -> None:
    pn.panel(market)
    pn.panel(market)
    callback = market._callback

    assert callback is not None and callback.period == 2000
    market.stop()
    assert market._callback is None and not callback.running


# -- monitor -----------------------------------------------------------------------------------


def test_monitor_collects_throughput_and_counts(source: FrameSource) -> None:
    now = [1000.0]
    collector = MonitorCollector(source, clock=lambda: now[0], sessions=lambda: 3)
    rng = np.random.default_rng(0)

    collector.sample()
    for _ in range(5):
        source.tick(rng)  # 12 symbols x 2 timeframes = 24 upserted rows per tick
    now[0] += 2.0
    row = collector.sample()

    assert row["trades_per_s"] == pytest.approx(5 * 24 / 2.0)
    assert row["received"] == source.status()["received"] and row["sessions"] == 3
    assert row["rss_mb"] > 0 and row["flush_ms_p99"] == 4.0
    assert np.isnan(row["cache_entries"])  # no cache on this source
    seq, rows = collector.since(0)
    assert seq == 2 and len(rows) == 2 and collector.since(seq) == (2, [])


def test_monitor_view_shows_values_and_streams_samples(source: FrameSource) -> None:
    source.set_status(quarantined=3, quarantined_by_reason={"too_late": 2, "bad_time": 1})
    collector = MonitorCollector(source)
    view = MonitorView(source=source, collector=collector)
    collector.sample()
    events = record_events(view._figures_pane.object)

    assert view.refresh()

    assert set(view.data) == {"time", *SERIES} and len(view.data["time"]) == 1
    assert "quarantined" in view._cards.object and "too_late" in view._reasons.object
    assert not view.cache_figure.visible
    events.clear()
    collector.sample()
    assert view.refresh() and events.count(("ColumnsStreamedEvent", "monitor")) == 1
    assert len(view.data["time"]) == 2 and not view.refresh()


def test_monitor_charts_the_cache_when_the_source_has_one(source: FrameSource) -> None:
    source.cache = Cache(CacheConfig(max_entries=8, ttl_s=None))
    source.breadth("1m")
    source.heatmap("1m")  # same version: a hit
    collector = MonitorCollector(source)
    view = MonitorView(source=source, collector=collector)

    collector.sample()
    view.refresh()

    assert view.cache_figure.visible
    assert view.data["cache_entries"][-1] == 1 and view.data["cache_hit_pct"][-1] == 50.0
    assert "cache hit rate" in view._cards.object and "50.0 %" in view._cards.object


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B" and format_bytes(5 * 2**20) == "5.0 MiB"


# -- the app -----------------------------------------------------------------------------------


def test_app_switches_pages_and_stops_hidden_ones(source: FrameSource) -> None:
    app = App(source)
    assert app.state.page == "candles" and list(app.views) == ["candles"]

    app._nav.value = "market"
    market = app.view
    assert isinstance(market, MarketView) and market._callback is not None  # shown: refreshing
    assert [p.visible for p in app._main.objects] == [False, True]

    app.state.page = "monitor"
    assert isinstance(app.view, MonitorView) and market._callback is None
    assert [p.visible for p in app._main.objects] == [False, False, True]
    assert "Monitor" in app._title.object

    app.state.page = "market"  # built once, reused
    assert app.view is market and app._nav.value == "market"
    assert set(app.views) == {"candles", "market", "monitor"}


def test_tile_click_in_the_app_shows_candles_of_that_symbol(source: FrameSource) -> None:
    app = App(source)
    app.state.page = "market"
    market = app.view
    index = int(np.flatnonzero(market.tiles["symbol"] == "SYM05")[0])

    market._tiles.selected.indices = [index]

    assert app.state.page == "candles" and app._nav.value == "candles"
    assert app.view.price_figure.title.text.startswith("SYM05 ·")


@pytest.mark.parametrize("page", ["candles", "market", "quality", "alerts", "monitor"])
def test_periodic_ticks_wait_for_the_served_page_to_load(page: str, source: FrameSource,
                                                         monkeypatch) -> None:
    # Panel drops model changes made between the browser's pull of the document and its
    # document_ready: a tick must not change anything before the page has loaded.
    from types import SimpleNamespace

    from dashboards.app import VIEWS

    view = VIEWS[page](AppState.from_source(source, page=page), source)
    calls = []
    monkeypatch.setattr(view, "refresh", lambda: calls.append(page))
    state = type(pn.state)
    monkeypatch.setattr(state, "curdoc", property(
        lambda self: SimpleNamespace(session_context=object())))
    loaded = [False]
    monkeypatch.setattr(state, "loaded", property(lambda self: loaded[0]))

    view._tick()
    assert calls == []
    loaded[0] = True
    view._tick()
    assert calls == [page]


def test_a_page_that_raises_is_one_line_and_retried(source: FrameSource, monkeypatch,
                                                    caplog) -> None:
    from dashboards import app as app_module

    calls = []

    def flaky(state, src):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("operands could not be broadcast\nsecond line")
        return app_module.QualityView(state, src)

    monkeypatch.setitem(app_module.VIEWS, "quality", flaky)
    app = App(source)
    app.state.page = "quality"  # the view raises: an alert in its place, the header still works

    shown = [p for p in app._main.objects if p.visible]
    assert len(shown) == 1 and isinstance(shown[0], pn.pane.Alert)
    assert shown[0].object == ("The Quality page could not be drawn: ValueError: operands "
                               "could not be broadcast. The details are in the server's log; "
                               "open the page again to retry.")
    assert "quality" not in app.views and "could not draw the quality page" in caplog.text
    assert "Quality" in app._title.object

    app.state.page = "market"
    app.state.page = "quality"  # opened again: built this time, the alert gone
    assert isinstance(app.view, app_module.QualityView)
    assert not any(isinstance(p, pn.pane.Alert) for p in app._main.objects)
    assert [type(p).__name__ for p in app._main.objects if p.visible] != ["Alert"]
    for view in app.views.values():
        view.stop()


def test_create_app_renders_every_page(source: FrameSource) -> None:
    for page in PAGES:
        app = App(source, state=AppState.from_source(source, page=page))
        assert pn.panel(app).get_root() is not None
        for view in app.views.values():
            view.stop()
    assert create_app(source).get_root() is not None


def test_market_views_share_one_derivation_per_version_and_never_its_arrays() -> None:
    from flows.feeds.simulated import SimulatedMarket
    from flows.pipeline import Flow, FlowConfig

    flow = Flow(FlowConfig(store=None, timeframes=("1m", "5m"), history=120, window=30))
    market = SimulatedMarket(flow.table, n_symbols=30, rate=200.0, seed=5,
                             start_ns=1_704_205_800 * 10**9, batch_ms=1000)
    batches = market.batches(10 * 60)
    for _, batch in zip(range(300), batches):
        flow.push(batch)
    views = [MarketView(AppState.from_source(flow), flow) for _ in range(3)]
    flow.push(next(batches))
    misses = flow.cache.stats().misses
    assert all(view.refresh() for view in views)
    # breadth, heatmap (tiles and movers), sectors: derived once for the three views, on top
    # of the flow's own three reads.
    assert flow.cache.stats().misses - misses == 6
    tiles = views[0]._shared("tiles")
    assert all(view._shared("tiles") is tiles for view in views)
    for view in views:
        assert view.tiles["symbol"].tolist() == tiles["symbol"].tolist()
        assert all(view._tiles.data[k] is not tiles[k] for k in tiles)  # patched in place
        assert all(view._breadth.data[k] is not views[0]._shared("breadth")[k]
                   for k in view._breadth.data)
    # A view's patch leaves the shared columns and the other views alone.
    before = tiles["return"].copy()
    views[0]._tiles.patch({"return": [(0, 123.0)]})
    np.testing.assert_array_equal(tiles["return"], before)
    assert views[1]._tiles.data["return"][0] != 123.0
    flow.close()
