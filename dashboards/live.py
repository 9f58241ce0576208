"""The one periodic refresh a live view runs per session."""
from __future__ import annotations

import panel as pn


class PeriodicRefresh:
    """Mixin for a Viewer with ``refresh()`` and ``period`` (ms): one periodic callback per
    session, started once, stopped when the session ends (or by :meth:`stop`)."""

    _callback: pn.io.PeriodicCallback | None = None
    #: refresh once at start, before the first period (views that draw from refreshes)
    draw_on_start: bool = False

    def start(self) -> None:
        """Start this view's periodic refresh (once), stopping it when the session ends."""
        if self._callback is not None:
            return
        if self.draw_on_start:
            self.refresh()
        self._callback = pn.state.add_periodic_callback(self.refresh, period=self.period)
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            pn.state.on_session_destroyed(lambda _ctx: self.stop())

    def stop(self) -> None:
        """Stop the periodic refresh."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
