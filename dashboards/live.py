"""The one periodic refresh a live view runs per session."""
from __future__ import annotations

import panel as pn


class PeriodicRefresh:
    """Mixin for a Viewer with ``refresh()`` and ``period`` (ms): one periodic callback per
    session, started once, stopped when the session ends (or by :meth:`stop`).

    In a served session the callback starts once the page has loaded (``pn.state.onload``):
    a change sent while the browser is still building the document it pulled would be
    applied twice (Bokeh's "Size mismatch" on streamed columns).
    """

    _callback: pn.io.PeriodicCallback | None = None
    _wanted: bool = False

    def start(self) -> None:
        """Start this view's periodic refresh (once), stopping it when the session ends."""
        if self._callback is not None or self._wanted:
            return
        self._wanted = True
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None and not pn.state.loaded:
            pn.state.onload(self._start_now)
        else:
            self._start_now()

    def _start_now(self) -> None:
        if not self._wanted or self._callback is not None:
            return  # stopped before the page loaded, or already running
        self._callback = pn.state.add_periodic_callback(self.refresh, period=self.period)
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            pn.state.on_session_destroyed(lambda _ctx: self.stop())

    def stop(self) -> None:
        """Stop the periodic refresh."""
        self._wanted = False
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
