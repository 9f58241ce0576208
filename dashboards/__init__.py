"""Panel dashboards: the read side of tapeflow (never emits into a flow).

Each page is a :class:`panel.viewable.Viewer` taking an :class:`~dashboards.state.AppState`
and a :class:`~dashboards.source.BarSource`; the same objects render inline in Jupyter.
"""
from __future__ import annotations
