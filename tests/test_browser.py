"""The served candles page in real Chromium: it loads offline, draws, updates live, switches
symbol from the search picker, and keeps the user's zoom across updates."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import free_port

from dashboards.candles import DOWN_COLOR, UP_COLOR

# One worker runs the browser, load and notebook tests in turn (see the Makefile).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser"),
              pytest.mark.usefixtures("compiled_kernels")]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Everything below reads the Bokeh document model in the page, not the DOM, so it does not
# depend on Panel's markup: the view names its source "candles" and its figure "price".
_SNAPSHOT_JS = """() => {
  const doc = Bokeh.documents[0], s = doc.get_model_by_name('candles');
  const f = doc.get_model_by_name('price'), n = s.data.close.length;
  return {n, close: n ? s.data.close[n - 1] : null, first: n ? s.data.close[0] : null,
          time: n ? s.data.time[n - 1] : null, title: f.title.text,
          x0: f.x_range.start, x1: f.x_range.end, y0: f.y_range.start, y1: f.y_range.end,
          times: Array.from(s.data.time)};
}"""
_READY_JS = """() => window.Bokeh && Bokeh.documents.length > 0
  && Bokeh.documents[0].get_model_by_name('candles') != null
  && Bokeh.documents[0].get_model_by_name('candles').data.close.length > 0"""
_CHANGED_JS = """(before) => {
  const s = Bokeh.documents[0].get_model_by_name('candles'), n = s.data.close.length;
  return n !== before.n || s.data.close[n - 1] !== before.close
    || s.data.time[n - 1] !== before.time;
}"""
_COMPLETIONS_JS = """() => Bokeh.documents[0].all_models && [...Bokeh.documents[0].all_models]
  .filter(m => m.completions !== undefined).map(m => Array.from(m.completions))[0]"""


class Server:
    """A server subprocess in its own process group, ready once it prints its URL."""

    def __init__(self, cmd: list[str], port: int, timeout: float = 120.0):
        self.url = f"http://127.0.0.1:{port}/"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready = threading.Event()
        banner = f"serving on http://127.0.0.1:{port}"

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if banner in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not print {banner!r}:\n" + "\n".join(self.lines[-40:]))
        while True:  # the banner may precede the first answered request by a little
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    assert response.status == 200
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """End the whole process group: SIGTERM, then SIGKILL after 5 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass


@pytest.fixture
def start_server(request: pytest.FixtureRequest):
    """Start a server command (``{port}`` in it is replaced); stopped at teardown."""
    servers: list[Server] = []

    def start(cmd: list[str], port: int) -> Server:
        server = Server(cmd, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        # Shown by pytest only when the test failed: what the server said.
        print(f"--- {' '.join(server.proc.args[1:])} ---", *server.lines[-80:], sep="\n")


def count_candle_pixels(png: bytes) -> int:
    """Return how many pixels of a screenshot have the up or down candle colour."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    total = 0
    for color in (UP_COLOR, DOWN_COLOR):
        target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        total += int((np.abs(rgb - target).max(axis=-1) <= 8).sum())
    return total


def check_candles_page(browser, url: str, name: str) -> None:
    """Run every page check against a served app; screenshots go to ``test-artifacts/``."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    requests: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("websocket", lambda ws: requests.append(ws.url))
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # Arrange: the page loads and draws candles.
        page.goto(url, wait_until="load", timeout=20_000)
        page.wait_for_function(_READY_JS, timeout=20_000)
        shot = b""
        for _ in range(10):  # the canvas paints after the data arrives: give it a few frames
            page.wait_for_timeout(500)
            shot = page.screenshot(path=str(ARTIFACTS / f"{name}-loaded.png"))
            if count_candle_pixels(shot) > 300:
                break
        before = page.evaluate(_SNAPSHOT_JS)
        assert before["n"] > 0 and before["x0"] < before["time"] < before["x1"]
        assert count_candle_pixels(shot) > 300, "no candle colours painted"

        # Live: the forming bar changes or a new bar appears within a few seconds.
        page.wait_for_function(_CHANGED_JS, arg=before, timeout=10_000)

        # Picker: type part of another symbol, take the completion, see its data drawn.
        symbols = page.evaluate(_COMPLETIONS_JS)
        current = before["title"].split(" · ")[0]
        target, typed = pick_symbol(symbols, current)
        box = page.locator("input[placeholder='Search symbol']")
        box.click()
        box.fill("")
        box.press_sequentially(typed, delay=30)
        page.wait_for_timeout(300)
        box.press("Enter")
        page.wait_for_function("(t) => Bokeh.documents[0].get_model_by_name('price')"
                               ".title.text.startsWith(t + ' ·')", arg=target, timeout=10_000)
        page.wait_for_function(_READY_JS, timeout=10_000)
        page.wait_for_timeout(1_500)  # the picker's last value event and its reload settle
        switched = page.evaluate(_SNAPSHOT_JS)
        assert switched["first"] != before["first"] or switched["close"] != before["close"]
        page.screenshot(path=str(ARTIFACTS / f"{name}-switched.png"))

        # Zoom: a range the user set survives two updates (both x and the fitted y are kept
        # out of the server's hands; y follows the visible bars in the browser).
        times = switched["times"]
        start, end = times[max(0, len(times) // 4)], times[-1] - (times[-1] - times[0]) / 4
        if end <= start:
            end = start + 600_000
        # Set twice, 0.4 s apart, as a drag sends several range events: a single programmatic
        # set can cross the server's follow-shift of that same tick on the wire (the server
        # has not yet seen the user's range), and then the shift lands after it. Known race,
        # noted in issue 5; a real pan or zoom keeps sending ranges while the user moves.
        for _ in range(2):
            page.evaluate("([a, b]) => Bokeh.documents[0].get_model_by_name('price')"
                          ".x_range.setv({start: a, end: b})", [start, end])
            page.wait_for_timeout(400)
        state = page.evaluate(_SNAPSHOT_JS)
        for _ in range(2):
            page.wait_for_function(_CHANGED_JS, arg=state, timeout=10_000)
            state = page.evaluate(_SNAPSHOT_JS)
        page.wait_for_timeout(1_200)  # one more server tick that could have moved it
        zoomed = page.evaluate(_SNAPSHOT_JS)
        assert (zoomed["x0"], zoomed["x1"]) == (start, end)
        page.screenshot(path=str(ARTIFACTS / f"{name}-zoomed.png"))
    finally:
        page.close()

    # BokehJS sometimes logs its internal "Size mismatch" assertion (a renderer's index bitset
    # checked against a just-streamed column) about one run in seven; the chart's data, paint
    # and zoom are asserted above. Known issue, noted in issue 5; every other error fails.
    errors = [e for e in errors if e != "Size mismatch"]
    assert not errors, f"console errors: {errors}"
    assert not failed, f"failed requests: {failed}"
    outside = [u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).hostname not in LOOPBACK]
    assert not outside, f"requests left the machine: {outside}"
    assert requests, "no request recorded"


def pick_symbol(symbols: list[str], current: str) -> tuple[str, str]:
    """Return another symbol and a part of it (not its start) that matches only it."""
    assert symbols and len(symbols) > 1, f"picker has no choices: {symbols}"
    for symbol in symbols:
        if symbol == current or len(symbol) < 2:
            continue
        for cut in range(1, len(symbol)):
            part = symbol[cut:].lower()
            if sum(part in s.lower() for s in symbols) == 1:
                return symbol, part
        if sum(symbol.lower() in s.lower() for s in symbols) == 1:
            return symbol, symbol.lower()
    pytest.fail(f"no symbol other than {current} can be singled out in {symbols}")


def test_page_over_frame_source(chromium, start_server) -> None:
    port = free_port()
    server = start_server([sys.executable, "tests/serve_fake.py", "--port", str(port)], port)

    check_candles_page(chromium, server.url, "fake")


def test_page_served_by_cli(chromium, start_server, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port),
         "--store", str(tmp_path / "market.zarr"), "--symbols", "20", "--rate", "500"], port)

    check_candles_page(chromium, server.url, "cli")


# -- the multi-page app: market and monitor pages, page switching, theme --------------------

_MODEL_JS = """(name) => window.Bokeh && Bokeh.documents.length > 0
  && Bokeh.documents[0].get_model_by_name(name) != null"""
_ROWS_JS = """([name, column]) => { const d = window.Bokeh && Bokeh.documents[0];
  const s = d && d.get_model_by_name(name); return s ? s.data[column].length : 0; }"""
# What a page shows, for a failed wait's report: each named data source's row count and
# the page's text.
_PAGE_STATE_JS = """() => { const d = window.Bokeh && Bokeh.documents[0]; if (!d) return 'no document';
  const rows = [...d.all_models].filter(m => m.name && m.data)
    .map(m => `${m.name}: ${Object.values(m.data)[0]?.length}`);
  return rows.join(', ') + ' | ' + document.body.innerText.slice(0, 600); }"""
# The screen position of a heatmap tile: the figure's data-to-pixel scales plus its element's
# place on the page, so a real mouse click goes through Bokeh's TapTool.
_TILE_JS = """(symbol) => {
  const doc = Bokeh.documents[0], fig = doc.get_model_by_name('heatmap_figure');
  const tiles = doc.get_model_by_name('heatmap'), i = Array.from(tiles.data.symbol).indexOf(symbol);
  const view = Bokeh.index.find_one(fig), box = view.el.getBoundingClientRect();
  return {x: box.left + view.frame.x_scale.compute(tiles.data.x[i]),
          y: box.top + view.frame.y_scale.compute(tiles.data.y[i])};
}"""


def serve_cli(start_server, tmp_path: Path) -> Server:
    """``tapeflow serve`` (20 simulated symbols, 5 minutes of backfill) on a free port."""
    port = free_port()
    return start_server(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port),
         "--store", str(tmp_path / "market.zarr"), "--symbols", "20", "--rate", "500",
         "--backfill", "5"], port)


def wait_for_rows(page, name: str, column: str, timeout_ms: float) -> None:
    """Wait until data source ``name`` has rows; on a timeout, print what the page shows."""
    try:
        page.wait_for_function(_ROWS_JS, arg=[name, column], timeout=timeout_ms)
    except Exception:
        print("page when the wait ended:", page.evaluate(_PAGE_STATE_JS))
        raise


def watch_page(page) -> dict[str, list[str]]:
    """Record the page's requests, failed requests and console errors."""
    seen: dict[str, list[str]] = {"requests": [], "failed": [], "errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("websocket", lambda ws: seen["requests"].append(ws.url))
    page.on("requestfailed", lambda r: seen["failed"].append(f"{r.url}: {r.failure}"))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    return seen


def assert_clean(seen: dict[str, list[str]]) -> None:
    assert not seen["errors"], f"console errors: {seen['errors']}"
    assert not seen["failed"], f"failed requests: {seen['failed']}"
    outside = [u for u in seen["requests"] if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).hostname not in LOOPBACK]
    assert not outside, f"requests left the machine: {outside}"
    assert seen["requests"], "no request recorded"


def count_colors(png: bytes, colors) -> int:
    """Return how many pixels of a screenshot have one of ``colors`` (hex)."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    total = 0
    for color in colors:
        target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        total += int((np.abs(rgb - target).max(axis=-1) <= 6).sum())
    return total


def test_pages_served_by_cli(chromium, start_server, tmp_path: Path) -> None:
    from dashboards.market import PALETTE, UNKNOWN_COLOR

    ARTIFACTS.mkdir(exist_ok=True)
    server = serve_cli(start_server, tmp_path)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch_page(page)
    try:
        # Market: the URL selects the page; heatmap, breadth, movers and sectors draw.
        page.goto(server.url + "?page=market", wait_until="load", timeout=20_000)
        # No reload: the first render used to miss its heatmap rows about one run in three
        # (a change made before the page had loaded; see PeriodicRefresh._tick).
        wait_for_rows(page, "heatmap", "symbol", 60_000)
        page.wait_for_function(_ROWS_JS, arg=["breadth", "time"], timeout=45_000)
        page.wait_for_function(_ROWS_JS, arg=["sectors", "sector"], timeout=45_000)
        assert page.evaluate(_ROWS_JS, ["heatmap", "symbol"]) == 20
        page.wait_for_timeout(500)  # let the canvases paint
        shot = page.screenshot(path=str(ARTIFACTS / "cli-market.png"), full_page=True)
        assert count_colors(shot, (*PALETTE, UNKNOWN_COLOR)) > 2000, "no heatmap tiles painted"
        page.wait_for_function("() => document.title === 'tapeflow · Market'", timeout=5_000)
        assert page.locator(".slick-row").count() > 0  # the movers tables render

        # Click a tile (a real mouse click at its screen position): its candles open.
        symbols = page.evaluate("() => Array.from(Bokeh.documents[0]"
                                ".get_model_by_name('heatmap').data.symbol)")
        target = symbols[len(symbols) // 2]
        point = page.evaluate(_TILE_JS, target)
        page.mouse.click(point["x"], point["y"])
        page.wait_for_function("(t) => { const f = Bokeh.documents[0].get_model_by_name('price');"
                               " return f != null && f.title.text.startsWith(t + ' ·'); }",
                               arg=target, timeout=10_000)
        page.wait_for_function(_READY_JS, timeout=10_000)
        page.wait_for_function("() => location.search.includes('page=candles')", timeout=5_000)
        page.screenshot(path=str(ARTIFACTS / "cli-candles-from-tile.png"))

        # Monitor from the header; its charts fill; the page survives a reload.
        page.get_by_role("button", name="Monitor").click()
        page.wait_for_function(_MODEL_JS, arg="throughput", timeout=10_000)
        page.wait_for_function("() => location.search.includes('page=monitor')", timeout=5_000)
        page.reload(wait_until="load")
        page.wait_for_function(_MODEL_JS, arg="throughput", timeout=20_000)
        page.wait_for_function(_ROWS_JS, arg=["monitor", "time"], timeout=20_000)
        page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('monitor')"
                               ".data.trades_per_s.some(v => v > 0)", timeout=10_000)
        assert page.evaluate(_MODEL_JS, "price") is False  # candles not built on reload
        page.locator(".tf-card-label", has_text="received").wait_for(timeout=5_000)
        page.screenshot(path=str(ARTIFACTS / "cli-monitor.png"), full_page=True)

        # Dark theme: the toggle reloads the same page dark, figures included.
        page.get_by_role("button", name="Dark").click()
        page.wait_for_function("() => location.search.includes('theme=dark')", timeout=10_000)
        page.wait_for_function(_ROWS_JS, arg=["monitor", "time"], timeout=20_000)
        page.wait_for_timeout(500)
        background = page.evaluate("() => Bokeh.documents[0].get_model_by_name('throughput')"
                                   ".background_fill_color")
        assert background == "#131722"
        assert "page=monitor" in page.url
        page.screenshot(path=str(ARTIFACTS / "cli-monitor-dark.png"), full_page=True)
        page.get_by_role("button", name="Market").click()
        page.wait_for_function(_ROWS_JS, arg=["heatmap", "symbol"], timeout=10_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "cli-market-dark.png"), full_page=True)
    finally:
        page.close()
    assert_clean(seen)


def test_quality_and_alerts_pages_served_by_cli(chromium, start_server, tmp_path: Path) -> None:
    from dashboards.alerts import EXAMPLES
    from dashboards.quality import SCORE_COLOR

    ARTIFACTS.mkdir(exist_ok=True)
    server = serve_cli(start_server, tmp_path)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch_page(page)
    try:
        # Quality: the URL selects the page; scores, the score history and the feeds draw.
        page.goto(server.url + "?page=quality", wait_until="load", timeout=20_000)
        # The kernels are compiled (compiled_kernels, and the server's own warm-up); the first
        # rows wait for the first batches after the backfill. Generous for a loaded machine.
        wait_for_rows(page, "quality_scores", "symbol", 90_000)
        page.wait_for_function(_ROWS_JS, arg=["quality_history", "time"], timeout=60_000)
        page.wait_for_function(_ROWS_JS, arg=["feeds", "feed"], timeout=10_000)
        page.wait_for_function("() => document.title === 'tapeflow · Quality'", timeout=5_000)
        assert page.evaluate(_ROWS_JS, ["quality_scores", "symbol"]) == 20
        assert page.locator(".slick-row").count() > 20  # the tables render their rows
        page.wait_for_timeout(500)  # let the canvas paint
        shot = page.screenshot(path=str(ARTIFACTS / "cli-quality.png"), full_page=True)
        assert count_colors(shot, (SCORE_COLOR,)) > 200, "no score line painted"

        # Alerts from the header: a bad rule shows its one-line reason, a good one is listed.
        page.get_by_role("button", name="Alerts").click()
        page.wait_for_function(_MODEL_JS, arg="alert_rules", timeout=10_000)
        page.wait_for_function("() => location.search.includes('page=alerts')", timeout=5_000)
        box = page.get_by_placeholder(EXAMPLES[0])
        box.fill("* rsi_14 >> 70")
        page.get_by_role("button", name="Add rule").click()
        page.get_by_text("unknown operator '>>'").wait_for(timeout=5_000)
        box.fill(EXAMPLES[0])
        page.get_by_role("button", name="Add rule").click()
        page.wait_for_function(_ROWS_JS, arg=["alert_rules", "id"], timeout=5_000)
        page.get_by_text("unknown operator '>>'").wait_for(state="hidden", timeout=5_000)
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "cli-alerts.png"), full_page=True)
    finally:
        page.close()
    assert_clean(seen)


# -- the candles page's indicators: overlays, panes, the forming bar ---------------------------

_FORMING_JS = """() => { const d = Bokeh.documents[0], c = d.get_model_by_name('candles').data;
  const f = d.get_model_by_name('candles_forming').data, n = c.time.length;
  return f.time.length === 2 && f.time[1] === c.time[n - 1] && Boolean(c.provisional[n - 1]); }"""


def test_candles_indicators_served(chromium, start_server) -> None:
    from dashboards.candles import OVERLAYS, PANES
    from dashboards.source import FrameSource

    # The indicators come from numba kernels, compiled on first use and cached on disk:
    # compile them here rather than inside the served page's first request.
    FrameSource.synthetic(1, n_bars=30).symbol_indicators("1m", "SYM00")
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    server = start_server([sys.executable, "tests/serve_fake.py", "--port", str(port)], port)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch_page(page)
    rsi, bollinger = PANES["rsi"].lines[0].color, OVERLAYS["bb"].lines[0].color
    try:
        # The default RSI pane paints its line; the forming bar has its dashed segments.
        page.goto(server.url, wait_until="load", timeout=20_000)
        page.wait_for_function(_READY_JS, timeout=20_000)
        page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('candles_rsi_pane')"
                               ".visible", timeout=10_000)
        page.wait_for_function(_FORMING_JS, timeout=10_000)
        shot = b""
        for _ in range(10):
            page.wait_for_timeout(500)
            shot = page.screenshot(full_page=True)
            if count_colors(shot, [rsi]) > 200:
                break
        assert count_colors(shot, [rsi]) > 200, "no RSI line painted"

        # Bollinger and MACD from their buttons: the band's lines and the MACD pane appear.
        page.get_by_role("button", name="Bollinger", exact=True).click()
        page.get_by_role("button", name="MACD", exact=True).click()
        page.wait_for_function("() => { const d = Bokeh.documents[0];"  # the pane is new
                               " const macd = d.get_model_by_name('candles_macd_pane');"
                               " return macd != null && macd.visible"
                               " && d.get_model_by_name('candles_bb_upper').visible; }",
                               timeout=10_000)
        for _ in range(10):
            page.wait_for_timeout(500)
            shot = page.screenshot(path=str(ARTIFACTS / "fake-candles-indicators.png"),
                                   full_page=True)
            if count_colors(shot, [bollinger]) > 300:
                break
        assert count_colors(shot, [bollinger]) > 300, "no Bollinger band painted"
        page.wait_for_function(_FORMING_JS, timeout=10_000)  # still right after live ticks
    finally:
        page.close()
    assert_clean(seen)
