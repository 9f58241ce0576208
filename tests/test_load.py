"""Load: 20 concurrent sessions against ``tapeflow serve`` (500 simulated symbols) for
``TAPEFLOW_LOAD_SECONDS`` (default 120): no errors, every session live, the server's session
count up to 20 and back to 0, and its memory back near its baseline once they have gone.

How it is measured
------------------
- The server is the real command (``python -m flows.cli serve``) on a free loopback port with
  a fresh store, with Bokeh's own logging at DEBUG (``BOKEH_PY_LOG_LEVEL``). That log is the
  server's word on its sessions: every websocket that pulls a document logs
  ``pull-doc-reply from session '<id>'``, every session Bokeh drops logs ``Discarding session
  '<id>'``, and every 15 s it logs ``N clients connected`` and ``/ has S sessions``. The app's
  own counter (``dashboards.monitor.SESSIONS``) is read from the monitor pages' series.
- The sessions: the pages in turn (candles on the most active symbols, market, monitor) over
  several timeframes. ``TAPEFLOW_LOAD_BROWSER_PAGES`` of them (default 3, one per page) are
  pages in one headless Chromium, checked for console errors, failed requests and requests
  leaving the machine; the others are Bokeh client sessions (``bokeh.client``), which pull
  the same document, send the ``document_ready`` event BokehJS sends, and receive every update.
  For the server the two are the same work; for this 2-core machine they are not: 20 live
  Chromium pages took 1.2-1.3 cores of their own (measured with ``=20``, load average 11-14),
  which starved the server (20 sessions took 115-150 s to open) and the pages themselves.
- They are opened together (a few client sessions at a time, as the server answers) and held
  until ``TAPEFLOW_LOAD_SECONDS`` after the first was requested, and at least 20 s after the
  last has drawn; the ramp-up is printed. A session counts as live when its document changed
  and its main data source (candles, heatmap tiles, monitor series) holds other data at the end.
- Memory is the server process's ``VmRSS`` from ``/proc/<pid>/status`` (the store writer is a
  child process the sessions do not touch). The baseline is taken after a warm-up (each page
  loaded once in the browser, then closed and its sessions discarded), as the median of five
  one-second samples; "after" likewise, once Bokeh has discarded all 20 sessions (15-32 s after
  they left: ``unused_session_lifetime`` 15 s, checked every 17 s), within 30 s of settling.

Tolerance, from measurement
---------------------------
2 cores shared with other engineers' test runs (load average 1-14). The flow alone sits at
about 550-570 MB and grows ~2 MB/min with no session. The first 20 sessions lift the server's
RSS by +48 to +62 MB (six runs with a baseline of 563-574 MB; +7 to +12 MB in three whose
warm-up had already lifted it to ~640 MB), and it stays there after they have gone: CPython
and glibc keep the memory the sessions freed and reuse it. Four cycles of 20 sessions against one server gave
+53, then +2, +4 and +7 MB more per cycle (the flow's own ~2 MB/min): a high-water mark, not a
leak, which would repeat every cycle (~2.6 MB per session). The assertion is the issue's bound,
*after - baseline <= max(15 %, 60 MB)* (about 85 MB here): it holds the measured high-water mark
with ~20 MB to spare and fails on a leak of more than ~4 MB per session. Smaller leaks are
within what one cycle can tell, which is why the test also requires every session to be gone
(all 20 discarded, Bokeh's count back to 0).

Never asserted: wall-clock durations. With the default 120 s the test takes about 3.5 minutes
(4.5 at load average 8: opening the 20 sessions is what stretches).
"""
from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import free_port

# One worker runs the browser, load and notebook tests in turn (see the Makefile).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser"),
              pytest.mark.usefixtures("compiled_kernels")]

ROOT = Path(__file__).resolve().parents[1]
LOAD_SECONDS = float(os.environ.get("TAPEFLOW_LOAD_SECONDS", "120"))
N_SESSIONS = 20
N_SYMBOLS = 500
#: Page -> (its main data source's name, a column that is non-empty once it has drawn).
PAGES = {"candles": ("candles", "close"), "market": ("heatmap", "symbol"),
         "monitor": ("monitor", "time")}
TIMEFRAMES = ("1m", "5m", "15m", "1h", "4h", "1d", "1m")
#: How many of the sessions are Chromium pages (the rest are Bokeh client sessions).
BROWSER_PAGES = int(os.environ.get("TAPEFLOW_LOAD_BROWSER_PAGES", "3"))
#: Client sessions opening at once (a few overlap the server's work and the client's).
OPEN_AT_ONCE = 4
#: All sessions stay open together at least this long, however long they took to open.
MIN_CONCURRENT_S = 20.0
#: Bokeh drops an unused session after 15 s, checking every 17 s; under load allow more.
DISCARD_TIMEOUT_S = 90.0
SETTLE_S = 30.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: Memory allowed above the baseline once the sessions are gone (see the module docstring).
TOLERANCE_FRACTION, TOLERANCE_MB = 0.15, 60.0

_READY_JS = """([name, column]) => { const d = window.Bokeh && Bokeh.documents[0];
  const s = d && d.get_model_by_name(name); return s != null && s.data[column].length > 0; }"""
# Count every change the document sees from now on (server patches included).
_COUNT_CHANGES_JS = """() => { window.__tf_changes = 0;
  Bokeh.documents[0].on_change(() => { window.__tf_changes++; }, true); }"""
_FINGERPRINT_JS = """(name) => { const s = Bokeh.documents[0].get_model_by_name(name);
  return JSON.stringify(Object.keys(s.data).sort().map(k => Array.from(s.data[k]).slice(-600))); }"""
_MOST_ACTIVE_JS = """() => { const d = Bokeh.documents[0].get_model_by_name('heatmap').data;
  return Array.from(d.symbol).map((s, i) => [d.volume[i], s]).sort((a, b) => b[0] - a[0])
    .slice(0, 7).map(p => p[1]); }"""
_MAX_SESSIONS_JS = """() => Math.max(...Bokeh.documents[0].get_model_by_name('monitor')
  .data.sessions.filter(Number.isFinite))"""

_PULL = re.compile(r"pull-doc-reply from session '([^']+)'")
_DISCARD = re.compile(r"Discarding session '([^']+)'")
_CLIENTS = re.compile(r"\] (\d+) clients connected")
_SESSIONS = re.compile(r"\s(\S+) has (\d+) sessions with (\d+) unused")


class LoggedServer:
    """``tapeflow serve`` in its own process group, its output kept with arrival times."""

    def __init__(self, args: list[str], port: int, timeout: float = 90.0):
        self.url = f"http://127.0.0.1:{port}/"
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BOKEH_PY_LOG_LEVEL": "debug"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), *args], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env=env)
        threading.Thread(target=self._read, daemon=True).start()
        banner = f"serving on http://127.0.0.1:{port}"
        if not self.wait(lambda: any(banner in line for _, line in self.log()), timeout):
            self.stop()
            pytest.fail(f"no {banner!r}:\n" + "\n".join(line for _, line in self.log()[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip()))

    def log(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, line) for t, line in self.lines if since <= t < until]

    def wait(self, condition, timeout: float, every: float = 0.2) -> bool:
        """Return whether ``condition()`` came true within ``timeout`` s (False if it died)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(every)
        return True

    def rss_mb(self) -> float:
        """The server's resident memory (``VmRSS``) in MB."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS in /proc status")

    def cpu_s(self) -> float:
        """CPU seconds the server has used (user + system)."""
        return process_cpu_s(self.proc.pid)

    def live_sessions(self) -> set[str]:
        """Sessions some browser pulled and Bokeh has not discarded since."""
        live: set[str] = set()
        for _, line in self.log():
            if m := _PULL.search(line):
                live.add(m.group(1))
            elif m := _DISCARD.search(line):
                live.discard(m.group(1))
        return live

    def stats(self, since: float = 0.0) -> list[tuple[float, int, int]]:
        """Bokeh's periodic ``(time, clients connected, sessions)`` reports after ``since``."""
        out, clients = [], None
        for t, line in self.log(since):
            if m := _CLIENTS.search(line):
                clients = int(m.group(1))
            elif (m := _SESSIONS.search(line)) and clients is not None:
                out.append((t, clients, int(m.group(2))))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tracebacks(lines: list[str]) -> list[tuple[list[str], str]]:
    """Split a log into its tracebacks: ``(frame files, exception line)`` for each."""
    found, i = [], 0
    while i < len(lines):
        if "Traceback (most recent call last)" not in lines[i]:
            i += 1
            continue
        files, i = [], i + 1
        while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
            if m := re.match(r'\s+File "([^"]+)"', lines[i]):
                files.append(m.group(1))
            i += 1
        found.append((files, lines[i].strip() if i < len(lines) else ""))
    return found


def disconnect_race(files: list[str], exception: str) -> bool:
    """Whether a traceback is Bokeh/Tornado's own race with a browser that just left.

    A periodic update written to a socket the browser closed (``WebSocketClosedError``; known:
    bokeh/bokeh#7619, holoviz/panel#3113), or a message from it still queued when Bokeh
    detached its session (``AssertionError`` in ``bokeh/server/connection.py``). Never when
    one of its frames is in our code.
    """
    ours = [f for f in files if f.startswith((str(ROOT / "flows"), str(ROOT / "dashboards")))]
    if ours or not files:
        return False
    kind = exception.split(":")[0]
    if kind in ("tornado.websocket.WebSocketClosedError", "tornado.iostream.StreamClosedError"):
        return True
    return kind == "AssertionError" and files[-1].endswith("bokeh/server/connection.py")


def log_problems(lines: list[str], disconnecting: bool) -> list[str]:
    """Tracebacks and error lines of a stretch of the server's log (see :func:`disconnect_race`)."""
    problems = [f"{exc} (in {files[-1] if files else '?'})" for files, exc in tracebacks(lines)
                if not (disconnecting and disconnect_race(files, exc))]
    for line in lines:
        if line.startswith(("ERROR:", "CRITICAL:")) and not (
                disconnecting and "bokeh.server.protocol_handler:error handling message" in line):
            problems.append(line)
    return problems


def watch(page, seen: dict[str, list[str]], phase: dict[str, str]) -> None:
    """Record the page's requests, failed requests and console errors, with the test's phase
    (nothing once it is ``leaving``)."""
    def note(kind: str, text: str) -> None:
        if phase["now"] != "leaving":
            seen[kind].append(f"{phase['now']}: {text}")

    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("requestfailed", lambda r: note("failed", f"{r.url}: {r.failure}"))
    page.on("console", lambda m: m.type == "error" and note("errors", m.text))
    page.on("pageerror", lambda e: note("errors", str(e)))


def median_rss(server: LoggedServer, samples: int = 5, every: float = 1.0) -> float:
    values = []
    for _ in range(samples):
        values.append(server.rss_mb())
        time.sleep(every)
    return statistics.median(values)



class ClientSession(threading.Thread):
    """One Bokeh client session (``bokeh.client``) on its own thread and IOLoop.

    It pulls the page's document, tells the server the page is ready (as BokehJS does once it
    has rendered it), counts the changes the server sends, and notes its page's main data when
    it starts and when it leaves. ``bokeh.client`` handles each message by awaiting the next
    one recursively, so a session held for minutes would reach Python's recursion limit; the
    loop here returns about every second (unwinding that chain) and starts again.
    """

    def __init__(self, url: str, page: str, arguments: dict[str, str]):
        super().__init__(daemon=True, name=f"bokeh-client-{page}")
        self.url, self.page, self.arguments = url, page, arguments
        self.changes = 0
        self.first: str | None = None
        self.last: str | None = None
        self.max_sessions: float | None = None
        self.max_cache_mb: float | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._session = None
        self._left = False

    def run(self) -> None:
        from bokeh.client import pull_session
        from bokeh.document.events import MessageSentEvent
        from bokeh.events import DocumentReady

        asyncio.set_event_loop(asyncio.new_event_loop())
        try:
            self._session = session = pull_session(url=self.url, arguments=self.arguments)
            connection = session._connection  # the loop below needs its state
            document = session.document
            self.first = self._fingerprint()
            document.on_change(self._count)
            # What BokehJS sends once it has built the page: the views start refreshing then.
            document.callbacks.trigger_on_change(
                MessageSentEvent(document, "bokeh_event", DocumentReady()))
            self.ready.set()
            while connection.connected:
                until = time.monotonic() + 1.0
                connection._loop_until(lambda until=until: time.monotonic() > until
                                       or not connection.connected)
            if not self._left:
                self.error = ConnectionError(f"disconnected by the server: "
                                             f"{connection.error_detail or connection.error_code}")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.ready.set()

    def _count(self, _event) -> None:
        self.changes += 1

    def _fingerprint(self) -> str:
        data = self._session.document.get_model_by_name(PAGES[self.page][0]).data
        return repr({k: list(v)[-600:] for k, v in sorted(data.items())})

    def leave(self) -> None:
        """Note the page's data and close the websocket (on the session's own loop, which a
        closing socket wakes even when no update is on its way)."""
        if self._session is not None and not self._left:
            self._session._connection.io_loop.add_callback(self._finish)

    def _finish(self) -> None:
        self.last = self._fingerprint()
        if self.page == "monitor":
            series = self._session.document.get_model_by_name("monitor").data
            self.max_sessions = max(filter(math.isfinite, series["sessions"]), default=0)
            self.max_cache_mb = max(filter(math.isfinite, series["cache_bytes"]),
                                    default=0) / 2**20
        self._left = True
        self._session.close("left")


def session_plan(base: str, symbols: list[str]) -> list[tuple[str, str, dict[str, str]]]:
    """The sessions' ``(page, url, query)``: the pages in turn, over several timeframes, the
    candles over ``symbols`` (active ones, so that each chart's own bars move)."""
    plan = []
    for i in range(N_SESSIONS):
        page = list(PAGES)[i % len(PAGES)]
        query = {"page": page} | ({} if page == "monitor" else {"tf": TIMEFRAMES[i // 3]})
        if page == "candles":
            query["symbol"] = symbols[i // 3 % len(symbols)]
        plan.append((page, base + "?" + "&".join(f"{k}={v}" for k, v in query.items()), query))
    return plan


@pytest.mark.timeout(LOAD_SECONDS + 420)
def test_twenty_sessions(chromium, tmp_path: Path) -> None:
    server = LoggedServer(["--store", str(tmp_path / "market.zarr"), "--symbols", str(N_SYMBOLS),
                           "--backfill", "2"], free_port())
    try:
        run_load(chromium, server)
    finally:
        server.stop()


def run_load(browser, server: LoggedServer) -> None:
    import panel.models  # noqa: F401  (the client sessions decode Panel's models ...)

    import dashboards.app  # noqa: F401  (... and the app's own)

    seen: dict[str, list[str]] = {"requests": [], "failed": [], "errors": []}
    phase = {"now": "warm-up"}

    # Arrange: each page drawn once (first-use imports, compilation and caches), then closed;
    # the baseline is taken once Bokeh has discarded those sessions.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    for name, (source, column) in PAGES.items():
        page = context.new_page()
        watch(page, seen, phase)
        page.goto(f"{server.url}?page={name}", wait_until="load", timeout=60_000)
        page.wait_for_function(_READY_JS, arg=[source, column], timeout=120_000)
        page.wait_for_load_state("networkidle", timeout=60_000)
        if name == "market":
            active = page.evaluate(_MOST_ACTIVE_JS)
        page.close()
    context.close()
    assert server.wait(lambda: not server.live_sessions(), DISCARD_TIMEOUT_S), \
        f"warm-up sessions never discarded: {server.live_sessions()}"
    baseline = median_rss(server)
    warm_up = [line for _, line in server.log()]

    # Act: 20 sessions (browser pages first, then client sessions, a few at a time as the
    # server answers), held until LOAD_SECONDS after the first was requested.
    phase["now"] = "load"
    started = time.monotonic()
    cpu0 = server.cpu_s()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pages, clients = [], []
    for i, (name, url, query) in enumerate(session_plan(server.url, active)):
        if i < BROWSER_PAGES:
            page = context.new_page()
            watch(page, seen, phase)
            page.goto(url, wait_until="commit", timeout=60_000)
            pages.append((name, page))
            continue
        while sum(not c.ready.is_set() for c in clients) >= OPEN_AT_ONCE:
            time.sleep(0.1)
        clients.append(ClientSession(server.url, name, query))
        clients[-1].start()
    for client in clients:
        client.ready.wait(180)
        assert client.error is None, f"client session {client.arguments}: {client.error!r}"
    peak = server.rss_mb()
    before = []
    for name, page in pages:
        page.wait_for_function(_READY_JS, arg=list(PAGES[name]), timeout=180_000)
        page.evaluate(_COUNT_CHANGES_JS)
        before.append(page.evaluate(_FINGERPRINT_JS, PAGES[name][0]))
    ramp_s = time.monotonic() - started
    while (time.monotonic() - started < max(LOAD_SECONDS, ramp_s + MIN_CONCURRENT_S)
           or not any(c == N_SESSIONS for _, c, _ in server.stats(started))):
        assert server.proc.poll() is None, "the server died under load"
        peak = max(peak, server.rss_mb())
        if time.monotonic() - started > max(LOAD_SECONDS, ramp_s + MIN_CONCURRENT_S) + 30:
            break  # Bokeh reports every 15 s; the assertion below says what it saw
        if pages:
            pages[0][1].wait_for_timeout(2_000)  # keeps Playwright serving the pages' events
        else:
            time.sleep(2.0)
    held_s = time.monotonic() - started
    server_cpu_pct = 100 * (server.cpu_s() - cpu0) / held_s
    page_changes = [page.evaluate("() => window.__tf_changes") for _, page in pages]
    after_data = [page.evaluate(_FINGERPRINT_JS, PAGES[name][0]) for name, page in pages]
    app_counts = [page.evaluate(_MAX_SESSIONS_JS) for name, page in pages if name == "monitor"]
    stats = server.stats(started)

    # Disconnect: the clients close their websockets, the pages leave, then the browser.
    phase["now"] = "leaving"
    leaving = time.monotonic()
    for client in clients:
        client.leave()
    for _, page in pages:
        page.goto("about:blank")
    context.close()
    for client in clients:
        client.join(30)
    app_counts += [int(c.max_sessions) for c in clients if c.max_sessions is not None]
    cache_mb = max((c.max_cache_mb for c in clients if c.max_cache_mb is not None), default=None)
    gone = server.wait(lambda: not server.live_sessions(), DISCARD_TIMEOUT_S)
    discarded_s = time.monotonic() - leaving
    allowed = baseline + max(TOLERANCE_FRACTION * baseline, TOLERANCE_MB)
    samples: list[float] = []
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        samples.append(server.rss_mb())
        if len(samples) >= 5 and statistics.median(samples[-5:]) <= allowed:
            break
        time.sleep(1.0)
    after = statistics.median(samples[-5:])
    # Bokeh's own count once the sessions are discarded (it reports every 15 s).
    settled = leaving + discarded_s
    server.wait(lambda: server.stats(settled), 20.0)
    final_stats = server.stats(settled)
    during = [line for _, line in server.log(started, leaving)]
    closing = [line for _, line in server.log(leaving)]
    changes = page_changes + [c.changes for c in clients]

    print(f"\nload: {N_SESSIONS} sessions ({len(pages)} browser pages, {len(clients)} Bokeh "
          f"clients), ramp-up {ramp_s:.0f} s, held {held_s:.0f} s, discarded "
          f"{discarded_s:.0f} s after leaving; load average {os.getloadavg()}")
    print(f"server RSS MB: baseline {baseline:.0f}, peak {peak:.0f} (+{peak - baseline:.0f}), "
          f"after {after:.0f} (+{after - baseline:.0f}; allowed +{allowed - baseline:.0f}); "
          f"server CPU {server_cpu_pct:.0f} % of a core under load; flow cache at most "
          f"{cache_mb or float('nan'):.0f} MB")
    print(f"document changes per session: {changes}; Bokeh (clients, sessions): "
          f"{[(c, s) for _, c, s in stats]} then {[(c, s) for _, c, s in final_stats]}; "
          f"app session counter max {app_counts}")

    # Assert: clean pages and a clean server log, under load and while the sessions leave.
    errors = [e for e in seen["errors"] if e != "Size mismatch"]  # see tests/test_browser.py
    assert not errors, f"console errors: {errors[:10]}"
    assert not seen["failed"], f"failed requests: {seen['failed'][:10]}"
    outside = [u for u in seen["requests"] if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).hostname not in LOOPBACK]
    assert not outside, f"requests left the machine: {outside[:10]}"
    problems = (log_problems(warm_up, disconnecting=True) + log_problems(during, disconnecting=False)
                + log_problems(closing, disconnecting=True))
    assert not problems, "server log:\n" + "\n".join(problems[:20])
    assert not [c.error for c in clients if c.error], [repr(c.error) for c in clients if c.error]
    # Every session was live: the server changed its document and its main data moved.
    assert all(n > 0 for n in changes), f"sessions without document changes: {changes}"
    stale = ([name for (name, _), a, b in zip(pages, before, after_data) if a == b]
             + [c.page for c in clients if c.first == c.last])
    assert not stale, f"sessions whose data never changed: {stale}"
    # The server's session count went to 20 and back to 0.
    assert max(c for _, c, _ in stats) == N_SESSIONS, f"Bokeh's clients: {stats}"
    assert max(s for _, _, s in stats) == N_SESSIONS, f"Bokeh's sessions: {stats}"
    assert app_counts and max(app_counts) == N_SESSIONS, f"app's session counter: {app_counts}"
    assert gone, f"sessions still live {DISCARD_TIMEOUT_S} s after leaving: {server.live_sessions()}"
    assert final_stats and final_stats[-1][1:] == (0, 0), f"Bokeh after leaving: {final_stats}"
    # Memory came back near the baseline.
    assert after <= allowed, (f"server RSS {after:.0f} MB after the sessions left, baseline "
                              f"{baseline:.0f} MB (allowed {allowed:.0f} MB)")
