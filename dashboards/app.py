"""The served tapeflow app: ``serve(source)`` from Python, or ``panel serve dashboards/app.py``.

Every session gets its own :class:`~dashboards.state.AppState` and views over one shared
source. The page is a plain Panel layout with local CSS: it loads nothing from the internet
(Panel and Bokeh serve their JavaScript from the same server).
"""
from __future__ import annotations

import socket
import time

import panel as pn

from dashboards.candles import CandlesView
from dashboards.source import BarSource, default_source
from dashboards.state import AppState

TITLE = "tapeflow"

_CSS = """
:host, body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
.tapeflow-title { font-size: 1.25em; font-weight: 700; letter-spacing: 0.02em; }
.tapeflow-message { color: #787b86; }
"""


def create_app(source: BarSource) -> pn.viewable.Viewable:
    """Return the page for one session: a title bar and the candles view over ``source``."""
    state = AppState.from_source(source)
    candles = CandlesView(state, source)
    return pn.Column(
        pn.pane.HTML(f'<span class="tapeflow-title">{TITLE}</span>', stylesheets=[_CSS]),
        candles,
        sizing_mode="stretch_width",
        stylesheets=[_CSS],
    )


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
    source : BarSource
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
