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
        self._callback = pn.state.add_periodic_callback(self._tick, period=self.period)
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            pn.state.on_session_destroyed(lambda _ctx: self.stop())

    def _tick(self) -> None:
        """The periodic callback: :meth:`refresh`, once the browser has loaded the page.

        Between the browser pulling a session's document and its ``document_ready`` event,
        Panel drops model changes made inside ``pn.io.hold()`` (it expects the document to
        be serialized after them), so a change made then never reaches that browser and the
        view, believing it shown, never sends it again (seen as a Quality or Market page
        whose table stayed empty). Until then a tick does nothing; the first one after
        catches up.
        """
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None and not pn.state.loaded:
            return
        self.refresh()

    def stop(self) -> None:
        """Stop the periodic refresh."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
