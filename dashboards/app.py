"""The served tapeflow app: ``serve(source)`` from Python, or ``panel serve dashboards/app.py``.

One app, five pages switched in the header: **Candles** (one symbol's live chart), **Market**
(breadth, sector heatmap, movers), **Quality** (data-quality scores per symbol and feed, feed
health, the quarantine), **Monitor** (pipeline, store and process figures) and **Alerts** (alert
rules and the alerts that fired). The page is in the URL (``?page=market``), so a reload or a
shared link opens the same page; the theme too (``?theme=dark``; the header's toggle switches
it). Every session gets its own :class:`~dashboards.state.AppState` and views over one shared
source; a page's views are built the first time it is shown, and only the shown page
refreshes. The page loads nothing from the internet (Panel and Bokeh serve their JavaScript
from the same server; system fonts only).
"""
from __future__ import annotations

import html
import logging
import socket
import time

import panel as pn
import param
from bokeh.themes import Theme as BokehTheme
from panel.custom import JSComponent

from dashboards.alerts import AlertsView
from dashboards.candles import FLAT_COLOR, UP_COLOR, CandlesView
from dashboards.market import MarketView
from dashboards.monitor import SESSIONS, MonitorView
from dashboards.quality import QualityView
from dashboards.source import BarSource, default_source
from dashboards.state import PAGES, AppState

TITLE = "tapeflow"

#: Page key -> view class.
log = logging.getLogger(__name__)

VIEWS = {"candles": CandlesView, "market": MarketView, "quality": QualityView,
         "monitor": MonitorView, "alerts": AlertsView}

#: Theme colours as CSS variables (the Bokeh figures get Panel's matching Bokeh theme).
_THEMES = {
    "default": {"--tf-bg": "#ffffff", "--tf-fg": "#131722", "--tf-muted": "#787b86",
                "--tf-card": "#f3f4f7", "--tf-border": "#d9dce3", "--tf-accent": "#2962ff"},
    "dark": {"--tf-bg": "#131722", "--tf-fg": "#d1d4dc", "--tf-muted": "#8a8e99",
             "--tf-card": "#1e222d", "--tf-border": "#2a2e39", "--tf-accent": "#5b8cff"},
}

_CSS = """
:host, body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
              color: var(--tf-fg); }
.tapeflow-title { font-size: 1.25em; font-weight: 700; letter-spacing: 0.02em; }
.tapeflow-title .tf-page { font-weight: 400; color: var(--tf-muted); }
.tapeflow-message, .tf-muted { color: var(--tf-muted); }
"""


#: Bokeh theme of the dark page (the light page keeps Bokeh's default look).
DARK_BOKEH_THEME = {"attrs": {
    "Plot": {"background_fill_color": "#131722", "border_fill_color": "#131722",
             "outline_line_color": "#2a2e39"},
    "Axis": {"axis_line_color": "#4c525e", "major_tick_line_color": "#4c525e",
             "minor_tick_line_color": "#4c525e", "major_label_text_color": "#d1d4dc",
             "axis_label_text_color": "#d1d4dc"},
    "Grid": {"grid_line_color": "#2a2e39"},
    "Title": {"text_color": "#d1d4dc"},
    "Legend": {"background_fill_color": "#1e222d", "label_text_color": "#d1d4dc",
               "border_line_color": "#2a2e39", "inactive_fill_color": "#131722"},
    "Toolbar": {"logo": None},
}}


def _page_css(theme: str) -> str:
    variables = "; ".join(f"{k}: {v}" for k, v in _THEMES[theme].items())
    return (f":root, :host {{ {variables}; }}\n"
            "html, body { background: var(--tf-bg); color: var(--tf-fg); margin: 0; }\n" + _CSS)


_TOGGLE_THEME_JS = """
const url = new URL(window.location.href);
url.searchParams.set('theme', url.searchParams.get('theme') === 'dark' ? 'default' : 'dark');
window.location.assign(url.toString());
"""


class PageTitle(JSComponent):
    """Sets the browser tab's title (Bokeh does not carry a document's title changes to the
    browser, and Panel fixes the served page's title)."""

    title = param.String(default=TITLE)

    _esm = """
    export function render({ model }) {
      document.title = model.title;
      model.on("title", () => { document.title = model.title; });
    }
    """


class App(pn.viewable.Viewer):
    """One session's app: a header (title, page switch, feed state, theme) over the page shown.

    Parameters
    ----------
    source : MarketSource
        Shared by all sessions.
    state : AppState, optional
        The session's state; by default one over ``source`` (page, symbol and timeframe from
        the URL query when served).
    theme : str
        ``default`` (light) or ``dark``; default: Panel's session theme (``?theme=``).

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> app = App(FrameSource.synthetic(3, n_bars=20))
    >>> app.state.page = "market"
    >>> type(app.view).__name__, sorted(app.views)
    ('MarketView', ['candles', 'market'])
    """

    state = param.ClassSelector(class_=AppState, doc="The session's app state.")

    source = param.Parameter(doc="The MarketSource shared by all sessions.")

    period = param.Integer(default=2000, doc="Milliseconds between feed-state checks.")

    def __init__(self, source: BarSource, state: AppState | None = None,
                 theme: str | None = None, **params):
        theme = theme or (pn.config.theme if pn.config.theme in _THEMES else "default")
        if state is None:
            state = AppState.from_source(source, **_query_params(source))
        super().__init__(source=source, state=state, **params)
        self.theme = theme
        self.views: dict[str, pn.viewable.Viewer] = {}
        self._panels: dict[str, pn.viewable.Viewable] = {}
        self._callback: pn.io.PeriodicCallback | None = None
        css = _page_css(theme)
        self._title = pn.pane.HTML("", stylesheets=[css], css_classes=["tapeflow-header-title"])
        self._nav = pn.widgets.RadioButtonGroup(
            options={label: key for key, label in PAGES.items()}, value=self.state.page,
            color="primary", variant="outline", css_classes=["tapeflow-nav"])
        self._nav.param.watch(self._on_nav, "value")
        self._page_title = PageTitle(title=TITLE, visible=False)
        self._feed = pn.pane.HTML("", stylesheets=[css], css_classes=["tapeflow-feed"],
                                  min_width=220)
        self._theme_button = pn.widgets.Button(
            label="☾ Dark" if theme == "default" else "☀ Light", color="light",
            css_classes=["tapeflow-theme"], width=90)
        self._theme_button.js_on_click(code=_TOGGLE_THEME_JS)
        self._main = pn.Column(sizing_mode="stretch_width", css_classes=["tapeflow-main"])
        self._layout = pn.Column(
            pn.Row(self._title, self._nav, pn.layout.HSpacer(), self._feed, self._theme_button,
                   self._page_title, sizing_mode="stretch_width", css_classes=["tapeflow-header"],
                   styles={"border-bottom": "1px solid var(--tf-border)"}),
            self._main,
            sizing_mode="stretch_width", stylesheets=[css], css_classes=["tapeflow-app"],
            styles={"background": "var(--tf-bg)", "color": "var(--tf-fg)"},
        )
        self._show()
        self._update_feed()

    @property
    def view(self) -> pn.viewable.Viewer:
        """The view of the page shown."""
        return self.views[self.state.page]

    def _view(self, page: str) -> pn.viewable.Viewer:
        if page not in self.views:
            self.views[page] = VIEWS[page](self.state, self.source)
        return self.views[page]

    def _on_nav(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.state.page:
            self.state.page = event.new

    @param.depends("state.page", watch=True)
    def _show(self) -> None:
        page = self.state.page
        try:
            view = self._view(page)
        except Exception as exc:  # a bug in one page must not blank the app
            log.exception("could not draw the %s page", page)
            view = None
            self._failed(page, exc)
        if view is not None and (page not in self._panels
                                 or isinstance(self._panels[page], pn.pane.Alert)):
            self._drop_panel(page)
            self._panels[page] = pn.panel(view)
            self._main.append(self._panels[page])
        for key, other in self.views.items():
            if key != page:
                other.stop()
        for key, panel in self._panels.items():
            panel.visible = key == page
        if self._nav.value != page:
            self._nav.value = page
        self._page_title.title = f"{TITLE} · {PAGES[page]}"
        self._title.object = (f'<span class="tapeflow-title">{TITLE} '
                              f'<span class="tf-page">· {html.escape(PAGES[page])}</span></span>')
        doc = pn.state.curdoc
        if view is not None and doc is not None and doc.session_context is not None:
            view.start()

    def _drop_panel(self, page: str) -> None:
        old = self._panels.pop(page, None)
        if old is not None:
            self._main.remove(old)

    def _failed(self, page: str, exc: Exception) -> None:
        """Show, in place of ``page``, one line saying it could not be drawn (tried again the
        next time the page is opened)."""
        self._drop_panel(page)
        self._panels[page] = pn.pane.Alert(
            f"The {PAGES[page]} page could not be drawn: {type(exc).__name__}: "
            f"{html.escape(str(exc).splitlines()[0] if str(exc) else '')}. The details are in the "
            "server's log; open the page again to retry.", alert_type="danger",
            sizing_mode="stretch_width")
        self._main.append(self._panels[page])

    def _update_feed(self) -> None:
        status = self.source.status()
        state = str(status.get("state", "?"))
        color = UP_COLOR if state.upper() == "LIVE" else "#f0a30a"
        self._feed.object = (
            f'<span style="color:{color};font-weight:600">● {html.escape(state)}</span> '
            f'<span style="color:{FLAT_COLOR}">{html.escape(str(status.get("feed", "")))} · '
            f'{int(status.get("received", 0)):,} trades</span>')

    def __panel__(self) -> pn.viewable.Viewable:
        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self._update_feed, period=self.period)
            doc = pn.state.curdoc
            if doc is not None and doc.session_context is not None:
                pn.state.on_session_destroyed(lambda _ctx: self._callback.stop())
        return self._layout


def _query_params(source: BarSource) -> dict:
    """Return the ``page``, ``symbol`` and ``timeframe`` given in the session's URL query."""
    args = pn.state.session_args if isinstance(pn.state.session_args, dict) else {}
    out = {}
    for key, name in (("page", "page"), ("symbol", "symbol"), ("tf", "timeframe")):
        value = args.get(key, [b""])[0].decode("utf-8", "replace")
        if not value:
            continue
        if name == "page" and value not in PAGES:
            continue
        if name == "timeframe" and value not in source.timeframes():
            continue
        out[name] = value
    return out


def create_app(source: BarSource) -> pn.viewable.Viewable:
    """Return the app for one session over ``source``: header, page switch and pages.

    In a server session it also keeps the URL's ``page`` query in sync with the page shown,
    counts the session for the monitor, and applies the session's theme to the figures.
    """
    app = App(source)
    doc = pn.state.curdoc
    if doc is not None and doc.session_context is not None:
        pn.config.global_css = [_page_css(app.theme)]  # per session: the page background
        if app.theme == "dark":  # before the models join the document, which applies it
            doc.theme = BokehTheme(json=DARK_BOKEH_THEME)
        SESSIONS.track()
        if pn.state.location is not None:
            pn.state.location.sync(app.state, {"page": "page"})
    return pn.panel(app)


def serve(
    source: BarSource,
    port: int = 5006,
    address: str = "127.0.0.1",
    show: bool = False,
    threaded: bool = True,
    **kw,
):
    """Serve :func:`create_app` over ``source`` at ``http://{address}:{port}/``.

    Parameters
    ----------
    source : MarketSource
        Shared by all sessions; it must be safe to read from the server's thread.
    port, address : int, str
        Where to listen; websocket connections are accepted from that host and port (and
        ``localhost:port`` when the address is loopback).
    show : bool
        Open a browser tab.
    threaded : bool
        With True (default) the server runs on its own thread and IOLoop and this returns,
        once the port accepts connections, with the server thread (call ``.stop()`` on it to
        shut down), so the caller's thread stays free to run the flow. With False this
        blocks, serving until interrupted; run the flow on another thread first.
    **kw
        Passed to :func:`panel.serve` (e.g. ``title``, ``admin``).

    Returns
    -------
    panel.io.threads.StoppableThread or bokeh.server.server.Server
    """
    origins = [f"{address}:{port}"]
    if address in ("127.0.0.1", "localhost", "::1"):
        origins += [f"localhost:{port}", f"127.0.0.1:{port}"]
    kw.setdefault("title", TITLE)
    kw.setdefault("websocket_origin", sorted(set(origins)))
    kw.setdefault("verbose", False)
    server = pn.serve({"/": lambda: create_app(source)}, port=port, address=address, show=show,
                      threaded=threaded, **kw)
    if threaded:
        _wait_listening(address, port, server)
    return server


def _wait_listening(address: str, port: int, thread, timeout: float = 30.0) -> None:
    """Return once ``address:port`` accepts connections; raise if the server thread died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            if not thread.is_alive():
                raise RuntimeError(f"the dashboard server on {address}:{port} failed to start")
            time.sleep(0.05)
    raise TimeoutError(f"the dashboard server on {address}:{port} did not start in {timeout} s")


if __name__.startswith("bokeh"):
    create_app(default_source()).servable(title=TITLE)
