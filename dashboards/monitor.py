"""The monitor page: pipeline throughput, flush times, store, counters, sessions, process and cache.

Sampling happens once per source, not once per browser tab: :func:`collector_for` returns the
process-wide :class:`MonitorCollector` of a source, whose one daemon thread samples every
``interval`` seconds into a bounded history. Each session's :class:`MonitorView` only reads the
samples it has not drawn yet and streams them into its charts.
"""
from __future__ import annotations

import html
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, is_dataclass

import numpy as np
import panel as pn

from dashboards.live import PeriodicRefresh
import param
import psutil
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    DatetimeTickFormatter,
    HoverTool,
    LinearAxis,
)
from bokeh.plotting import figure

from dashboards.candles import DOWN_COLOR, FLAT_COLOR, UP_COLOR
from dashboards.state import AppState

#: Samples kept (at one a second: 15 minutes).
HISTORY = 900
#: The series each sample holds (besides ``time``); cache series are NaN without a cache.
SERIES: tuple[str, ...] = (
    "trades_per_s", "received", "accepted", "quarantined", "duplicates", "flush_ms_p50",
    "flush_ms_p99", "store_bytes", "last_flush_age_s", "sessions", "rss_mb", "cpu_pct",
    "cache_entries", "cache_hit_pct", "cache_bytes", "cache_evictions", "cache_expirations",
    "latency_ms_p50", "latency_ms_p99", "validate_mtps", "quality_mtps", "bars_mtps",
)


_CARDS_CSS = """
.tf-card { display: inline-block; min-width: 120px; margin: 0 8px 8px 0; padding: 6px 10px;
           background: var(--tf-card, #f3f4f7); border: 1px solid var(--tf-border, #d9dce3);
           border-radius: 6px; vertical-align: top; }
.tf-card-label { font-size: 0.8em; color: var(--tf-muted, #787b86); }
.tf-card-value { font-size: 1.15em; font-weight: 600; }
table.tf-reasons { border-collapse: collapse; }
table.tf-reasons td, table.tf-reasons th { padding: 2px 12px 2px 0; text-align: left; }
"""


class SessionCounter:
    """Counts live dashboard sessions (each app session registers itself once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[int] = set()

    def track(self) -> None:
        """Count the current server session until it is destroyed (no-op outside a server)."""
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            return
        key = id(doc)
        with self._lock:
            if key in self._live:
                return
            self._live.add(key)

        def forget(_ctx: object) -> None:
            with self._lock:
                self._live.discard(key)

        pn.state.on_session_destroyed(forget)

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)


#: The process's dashboard sessions (the app registers each one).
SESSIONS = SessionCounter()


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return number


class MonitorCollector:
    """Samples a source's ``status()``, ``monitor()``, its cache and this process.

    Parameters
    ----------
    source : MarketSource
        Read with ``status()`` and ``monitor()``; ``source.cache.stats()`` when it has one.
    interval : float
        Seconds between samples of the sampler thread.
    history : int
        Samples kept.
    clock : callable
        Wall-clock seconds (injected in tests).
    sessions : callable
        Returns the number of live sessions.

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> now = [100.0]
    >>> c = MonitorCollector(FrameSource.synthetic(2, n_bars=3), clock=lambda: now[0])
    >>> c.sample()["received"], c.latest()["flush_ms_p50"]
    (0.0, 1.0)
    """

    def __init__(self, source, interval: float = 1.0, history: int = HISTORY,
                 clock: Callable[[], float] = time.time,
                 sessions: Callable[[], int] = SESSIONS.__len__):
        self.source = source
        self.interval = interval
        self.clock = clock
        self.sessions = sessions
        self._lock = threading.Lock()
        self._samples: deque[dict] = deque(maxlen=history)
        self._seq = 0
        self._status: dict = {}
        self._previous: tuple[float, float] | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading is meaningless; prime it
        self._figures: dict = {}
        self._cache: dict | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def cache(self):
        """The source's cache (anything with ``stats()``), or None."""
        cache = getattr(self.source, "cache", None)
        return cache if callable(getattr(cache, "stats", None)) else None

    def sample(self) -> dict:
        """Take one sample now, add it to the history and return it."""
        now = self.clock()
        status = dict(self.source.status())
        figures = dict(self.source.monitor()) if hasattr(self.source, "monitor") else {}
        received = _number(status.get("received", figures.get("received")))
        rate = math.nan
        if self._previous is not None and now > self._previous[0]:
            rate = max(0.0, (received - self._previous[1]) / (now - self._previous[0]))
        self._previous = (now, received)
        last_flush = _number(figures.get("last_flush"))
        memory = self._process.memory_info().rss / 2**20
        row = {
            "time": now * 1000.0,  # Bokeh datetimes are ms since the epoch
            "trades_per_s": rate, "received": received,
            "accepted": _number(status.get("accepted")),
            "quarantined": _number(status.get("quarantined")),
            "duplicates": _number(status.get("duplicates")),
            "flush_ms_p50": _number(figures.get("flush_ms_p50")),
            "flush_ms_p99": _number(figures.get("flush_ms_p99")),
            "store_bytes": _number(figures.get("store_bytes")),
            "last_flush_age_s": now - last_flush if last_flush > 0 else math.nan,
            "sessions": float(self.sessions()),
            "rss_mb": memory, "cpu_pct": self._process.cpu_percent(None),
            "latency_ms_p50": _number(figures.get("latency_ms_p50")),
            "latency_ms_p99": _number(figures.get("latency_ms_p99")),
        }
        stages = figures.get("stage_rates") or {}
        for stage in ("validate", "quality", "bars"):  # millions of trades per CPU second
            row[f"{stage}_mtps"] = _number(stages.get(stage)) / 1e6
        stats = self._cache_stats()
        for key in ("entries", "bytes", "evictions", "expirations"):
            row[f"cache_{key}"] = _number(stats.get(key)) if stats else math.nan
        row["cache_hit_pct"] = 100 * _number(stats.get("hit_rate")) if stats else math.nan
        with self._lock:
            self._samples.append(row)
            self._seq += 1
            self._status = status
            self._figures = figures
            self._cache = stats
        return row

    def _cache_stats(self) -> dict | None:
        cache = self.cache
        if cache is None:
            return None
        stats = cache.stats()
        return asdict(stats) if is_dataclass(stats) else dict(stats)

    @property
    def seq(self) -> int:
        """How many samples were ever taken (the newest sample's number)."""
        with self._lock:
            return self._seq

    def since(self, seq: int) -> tuple[int, list[dict]]:
        """Return the current ``seq`` and the kept samples numbered after ``seq``."""
        with self._lock:
            new = min(self._seq - seq, len(self._samples))
            return self._seq, list(self._samples)[len(self._samples) - new:] if new > 0 else []

    def latest(self) -> dict:
        """Return the newest sample with ``status``, ``figures`` and ``cache`` (dict or None)."""
        with self._lock:
            if not self._samples:
                return {}
            return {**self._samples[-1], "status": dict(self._status),
                    "figures": dict(self._figures), "cache": self._cache}

    def start(self) -> None:
        """Start the sampler thread (once)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="tapeflow-monitor",
                                            daemon=True)
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop the sampler thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:
                import logging

                logging.getLogger(__name__).exception("monitor sample failed")


_collectors: dict[int, MonitorCollector] = {}
_collectors_lock = threading.Lock()


def collector_for(source, interval: float = 1.0) -> MonitorCollector:
    """Return the process-wide, started collector of ``source`` (one sampler per source)."""
    with _collectors_lock:
        collector = _collectors.get(id(source))
        if collector is None or collector.source is not source:
            collector = MonitorCollector(source, interval=interval)
            _collectors[id(source)] = collector
    collector.start()
    return collector


def format_bytes(n: float) -> str:
    """Return a byte count in binary units.

    Examples
    --------
    >>> format_bytes(0), format_bytes(1536), format_bytes(3 * 2**30), format_bytes(float("nan"))
    ('0 B', '1.5 KiB', '3.0 GiB', '—')
    """
    if not math.isfinite(n):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fmt(value: float, spec: str = ",.0f", suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if math.isfinite(value) else "—"


class MonitorView(PeriodicRefresh, pn.viewable.Viewer):
    """Live pipeline, store, session, process and cache figures.

    Parameters
    ----------
    state : AppState
        Unused but for symmetry with the other pages (the monitor has no selection).
    source : MarketSource
        Sampled through :func:`collector_for` (or ``collector``).
    collector : MonitorCollector, optional
        Use this collector instead of the process-wide one (tests).

    Examples
    --------
    >>> from dashboards.source import FrameSource
    >>> src = FrameSource.synthetic(2, n_bars=3)
    >>> view = MonitorView(source=src, collector=MonitorCollector(src))
    >>> view.collector.sample() and view.refresh()
    True
    """

    state = param.ClassSelector(class_=AppState, allow_None=True, doc="The session's app state.")

    source = param.Parameter(doc="The source monitored.")

    period = param.Integer(default=2000, bounds=(50, None), doc="""
        Milliseconds between reads of new samples.""")

    def __init__(self, state: AppState | None = None, source=None,
                 collector: MonitorCollector | None = None, **params):
        if source is None:
            raise TypeError("MonitorView needs a source")
        super().__init__(state=state, source=source, **params)
        self.collector = collector if collector is not None else collector_for(source)
        self._seen = 0
        self._callback: pn.io.PeriodicCallback | None = None
        self._data = ColumnDataSource({k: np.empty(0) for k in ("time", *SERIES)},
                                      name="monitor")
        self._cards = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[_CARDS_CSS],
                                   css_classes=["tapeflow-cards"])
        self._reasons = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[_CARDS_CSS],
                                     css_classes=["tapeflow-reasons"])
        self._build_figures()
        self._layout = pn.Column(self._cards, self._reasons, self._figures_pane,
                                 sizing_mode="stretch_width", css_classes=["tapeflow-monitor"])
        self.refresh()

    def _build_figures(self) -> None:
        x_range = DataRange1d(range_padding=0.01, follow="end", follow_interval=HISTORY * 1000.0)
        common = {"x_axis_type": "datetime", "x_range": x_range, "height": 200,
                  "sizing_mode": "stretch_width", "tools": "xpan,xwheel_zoom,reset,save",
                  "toolbar_location": "right", "min_border_left": 60}

        clock = DatetimeTickFormatter(milliseconds="%H:%M:%S", seconds="%H:%M:%S",
                                      minsec="%H:%M:%S", minutes="%H:%M", hourmin="%H:%M",
                                      hours="%H:%M", context=None)

        def lines(fig, specs, right: str | None = None):
            """Draw ``(column, label, colour)`` lines; the last on a right axis named ``right``."""
            fig.xaxis.formatter = clock
            renderers = []
            for i, (y, label, color) in enumerate(specs):
                extra = {}
                if right is not None and i == len(specs) - 1:
                    fig.extra_y_ranges = {"right": DataRange1d()}
                    fig.add_layout(LinearAxis(y_range_name="right", axis_label=right), "right")
                    extra = {"y_range_name": "right"}
                renderers.append(fig.line(x="time", y=y, source=self._data, line_width=2,
                                          color=color, legend_label=label, **extra))
            fig.legend.location = "top_left"
            fig.legend.orientation = "horizontal"
            fig.legend.background_fill_alpha = 0.4
            fig.legend.label_text_font_size = "8pt"
            fig.legend.padding = fig.legend.margin = 2
            fig.add_tools(HoverTool(mode="vline", renderers=renderers[:1], formatters={
                "@time": "datetime"}, tooltips=[("time", "@time{%H:%M:%S}")]
                + [(label, f"@{y}{{0,0.[00]}}") for y, label, _ in specs]))
            return fig

        self.throughput_figure = lines(figure(name="throughput", title="throughput (trades/s)",
                                              **common),
                                       [("trades_per_s", "trades/s", "#2962ff")])
        self.flush_figure = lines(figure(name="flush", title="flush time (ms)", **common),
                                  [("flush_ms_p50", "p50", UP_COLOR),
                                   ("flush_ms_p99", "p99", DOWN_COLOR)])
        self.process_figure = lines(figure(name="process", title="process", **common),
                                    [("rss_mb", "memory MiB", "#ff9800"),
                                     ("cpu_pct", "CPU %", "#ab47bc")], right="CPU %")
        self.cache_figure = lines(figure(name="cache", title="cache", **common),
                                  [("cache_hit_pct", "hit rate %", "#ef5350"),
                                   ("cache_entries", "entries", "#26a69a")], right="entries")
        self.cache_figure.visible = self.collector.cache is not None
        self.latency_figure = lines(figure(name="latency", title="receive → bar latency (ms)",
                                           **common),
                                    [("latency_ms_p50", "p50", UP_COLOR),
                                     ("latency_ms_p99", "p99", DOWN_COLOR)])
        self.stages_figure = lines(figure(name="stages",
                                          title="stage throughput (M trades per CPU second)",
                                          **common),
                                   [("validate_mtps", "validate", "#2962ff"),
                                    ("quality_mtps", "quality", "#ff9800"),
                                    ("bars_mtps", "bars", UP_COLOR)])
        # Plain rows and columns: a Bokeh GridPlot inside Panel never reports itself rendered
        # (the document stays busy and later page switches do not reach the browser).
        grid = column(row(self.throughput_figure, self.flush_figure, sizing_mode="stretch_width"),
                      row(self.latency_figure, self.stages_figure, sizing_mode="stretch_width"),
                      row(self.process_figure, self.cache_figure, sizing_mode="stretch_width"),
                      sizing_mode="stretch_width")
        self._figures_pane = pn.pane.Bokeh(grid, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        self.start()
        return self._layout

    @property
    def data(self) -> dict[str, np.ndarray]:
        """The charted series (``time`` in ms and :data:`SERIES`)."""
        return self._data.data


    def refresh(self) -> bool:
        """Stream the samples taken since the last call and update the figures shown."""
        seq, rows = self.collector.since(self._seen)
        if not rows:
            return False
        self._seen = seq
        new = {k: np.array([row[k] for row in rows], dtype=float) for k in ("time", *SERIES)}
        self._data.stream(new, rollover=HISTORY)
        self.cache_figure.visible = self.collector.cache is not None
        self._update_cards(self.collector.latest())
        return True

    def _update_cards(self, latest: dict) -> None:
        status = latest.get("status", {})
        state = str(status.get("state", "?"))
        color = UP_COLOR if state.upper() == "LIVE" else "#f0a30a"
        cards = [
            ("feed", (f'<span style="color:{color}">● {html.escape(state)}</span> '
                      f'{html.escape(str(status.get("feed", "")))}')),
            ("trades/s", _fmt(latest["trades_per_s"])),
            ("received", _fmt(latest["received"])),
            ("accepted", _fmt(latest["accepted"])),
            ("quarantined", _fmt(latest["quarantined"])),
            ("duplicates", _fmt(latest["duplicates"])),
            ("receive → bar p50 / p99", (f'{_fmt(latest["latency_ms_p50"], ".1f")} / '
                                         f'{_fmt(latest["latency_ms_p99"], ".1f", " ms")}')),
            ("flush p50 / p99", (f'{_fmt(latest["flush_ms_p50"], ".1f")} / '
                                 f'{_fmt(latest["flush_ms_p99"], ".1f", " ms")}')),
            ("store", format_bytes(latest["store_bytes"])),
            ("last flush", _fmt(latest["last_flush_age_s"], ".1f", " s ago")),
            ("sessions", _fmt(latest["sessions"])),
            ("memory", format_bytes(latest["rss_mb"] * 2**20)),
            ("CPU", _fmt(latest["cpu_pct"], ".0f", " %")),
        ]
        cache = latest.get("cache")
        if cache:
            cards += [("cache entries", _fmt(_number(cache.get("entries")))),
                      ("cache hits / misses", (f'{_fmt(_number(cache.get("hits")))} / '
                                               f'{_fmt(_number(cache.get("misses")))}')),
                      ("cache hit rate", _fmt(100 * _number(cache.get("hit_rate")), ".1f", " %")),
                      ("cache size", format_bytes(_number(cache.get("bytes")))),
                      ("evictions / expirations",
                       (f'{_fmt(_number(cache.get("evictions")))} / '
                        f'{_fmt(_number(cache.get("expirations")))}')),
                      ("oldest entry", _fmt(_number(cache.get("oldest_age_s")), ".1f", " s"))]
        self._cards.object = "".join(
            f'<div class="tf-card"><div class="tf-card-label">{html.escape(label)}</div>'
            f'<div class="tf-card-value">{value}</div></div>' for label, value in cards)
        reasons = status.get("quarantined_by_reason") or {}
        if reasons:
            rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{int(v):,}</td></tr>"
                           for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
            self._reasons.object = (f'<table class="tf-reasons"><tr><th>quarantine reason</th>'
                                    f"<th>trades</th></tr>{rows}</table>")
        else:
            self._reasons.object = (f'<span style="color:{FLAT_COLOR}">No trades quarantined.'
                                    "</span>")


__all__ = ["HISTORY", "SERIES", "SESSIONS", "MonitorCollector", "MonitorView", "collector_for",
           "format_bytes"]
