"""Dashboard: first paint, update latency from the flow to the browser, server cost per session.

``python bench/bench_dashboard.py [--quick] [--sessions 1,5,20] [--symbols 500] [--profile]``

The server is this script again in a child process (``--serve``): a :class:`~flows.pipeline.Flow`
with a Zarr store and the store writer process (as ``tapeflow serve`` runs it), the simulated
market at ``--rate`` trades/s over ``--symbols`` symbols, and ``dashboards.app.serve(flow)``. Its
CPU and memory are then the server's alone. Bokeh discards a closed session after 2 s instead of
its default 15 s, so that the steps below do not wait for leftovers.

Printed:

* **first paint** of each page, median (min-max) of ``--paints`` loads: from navigation start
  (``performance.now()`` is 0 there) to the first animation frame after the page's main data
  source holds rows (the candles, the heatmap tiles, the monitor series): "cold" in a new browser
  context (nothing cached), "warm" when the same tab loads the page again; of the cold loads,
  when the HTML had arrived (the server builds the session's document before answering) and
  when the scripts had loaded (``DOMContentLoaded``);
* **update latency**, flow to browser, p50/p95: the child pushes a trade of a symbol of its own
  (``ZZMARK``) with a unique price every 1.2-2.2 s (longer than the candles page's 1 s refresh,
  so none is overwritten before it can be drawn) and prints when ``flow.push`` returned. A
  browser page showing that symbol's candles records, on every change to its document, when
  its last close first took each value (``performance.timeOrigin + performance.now()``). The
  two clocks are the same system clock; their offset is measured with the shortest of ten
  round trips (its half-width is printed as the uncertainty). Measured with that page alone
  and with the other sessions open;
* **server CPU and memory** with 0, 1, 5, 20 open sessions (``--sessions``), each held for
  ``--window`` seconds: CPU from ``/proc/<pid>/stat`` (utime + stime) over the window, RSS
  from ``/proc/<pid>/status``; the cost per session is the difference from 0 sessions divided
  by their number. Live (the market trading) and then quiet (feed and markers paused). The
  first session is the latency page; the others are the pages in turn, as Bokeh client
  sessions (``tests/test_load.py``'s, which send the ``document_ready`` a browser sends) or,
  with ``--browser-sessions``, Chromium pages (on 2 cores, 20 live Chromium pages take more
  than a core of their own and starve the server and the latency page alike);
* with ``--profile``, a cProfile of the server's IOLoop thread (where every session's
  callbacks run) over one window with the most sessions open, the market live.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MARKER = "ZZMARK"
#: Page -> (its main data source's name, a column that is non-empty once it has drawn).
PAGES = {"candles": ("candles", "close"), "market": ("heatmap", "symbol"),
         "monitor": ("monitor", "time")}

# Runs in every new document: note when the page's main source first has rows and a frame
# has been drawn after that.
_PAINT_JS = """(() => {
  const spec = %s;
  const page = new URLSearchParams(location.search).get('page') || 'candles';
  const [name, column] = spec[page];
  const tick = () => {
    const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
    const s = doc && doc.get_model_by_name(name);
    if (s && s.data[column] && s.data[column].length > 0) {
      requestAnimationFrame(() => { window.__tf_paint = performance.now(); });
      return;
    }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})();""" % {k: list(v) for k, v in PAGES.items()}
_READY_JS = """([name, column]) => { const d = window.Bokeh && Bokeh.documents[0];
  const s = d && d.get_model_by_name(name); return s != null && s.data[column].length > 0; }"""
# The latency page: the first time (epoch ms) each last close was seen.
_WATCH_CLOSE_JS = """() => { window.__tf_seen = {}; const doc = Bokeh.documents[0];
  doc.on_change(() => { const c = doc.get_model_by_name('candles').data.close, n = c.length;
    if (n && !(c[n - 1] in window.__tf_seen))
      window.__tf_seen[c[n - 1]] = performance.timeOrigin + performance.now(); }, true); }"""


_MARK = re.compile(r"mark (\d+) ([\d.]+) ([\d.]+) ([\d.]+)")


# -- the server (child process) ---------------------------------------------------------------

def serve_child(port: int, symbols: int, rate: float, store: str) -> None:
    """Run the flow, the marker pushes and the dashboard server; obey commands on stdin."""
    from dashboards.app import serve
    from flows.pipeline import Flow, FlowConfig
    from flows.runner import start_simulated
    from flows.schema import TradeBatch

    flow = Flow(FlowConfig(store=store, writer="process"))
    feed = start_simulated(flow, n_symbols=symbols, rate=rate, backfill_s=300)
    flow.table.codes([MARKER])
    flow.table.meta[MARKER] = {"sector": "Benchmark", "name": "latency marker",
                               "exchange": "BENCH"}
    paused = threading.Event()

    def mark() -> None:
        rng, seq = random.Random(7), 0
        while not paused.wait(rng.uniform(1.2, 2.2)):
            if flow.feed_state != "LIVE":
                continue
            seq += 1
            price = 1000.0 + 0.125 * seq  # exact in binary: the browser shows the same number
            batch = TradeBatch.from_columns(flow.table, time=[time.time_ns()], symbol=[MARKER],
                                            price=[price], size=[1.0], trade_id=[seq])
            t0 = time.time()
            flow.push(batch)
            t1 = time.time()
            # One write: other threads print too (a split line would lose the mark).
            sys.stdout.write(f"mark {seq} {price!r} {t1:.6f} {1000 * (t1 - t0):.2f}\n")
            sys.stdout.flush()

    server = serve(flow, port=port, threaded=False, start=False,
                   unused_session_lifetime_milliseconds=2000,
                   check_unused_sessions_milliseconds=1000)
    server.start()
    while flow.feed_state != "LIVE":
        time.sleep(0.2)
    threading.Thread(target=mark, name="bench-marker", daemon=True).start()

    def commands() -> None:
        for line in sys.stdin:
            word, *rest = line.split()
            if word == "pause":
                paused.set()
                feed.stop.set()
                print("paused", flush=True)
            elif word == "profile":
                server.io_loop.add_callback(profile_loop, server.io_loop, float(rest[0]))

    threading.Thread(target=commands, name="bench-commands", daemon=True).start()
    print(f"ready {port}", flush=True)
    try:
        server.io_loop.start()
    finally:
        feed.stop.set()
        flow.close()


def profile_loop(loop, seconds: float) -> None:
    """Profile the thread this runs on (the server's IOLoop) for ``seconds``; print the stats."""
    profiler = cProfile.Profile()
    profiler.enable()

    def report() -> None:
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(r"dashboards|flows|panel|bokeh", 40)
        stats.sort_stats("tottime").print_stats(15)
        sys.stdout.write("profile-begin\n" + out.getvalue() + "\nprofile-end\n")
        sys.stdout.flush()

    loop.call_later(seconds, report)


# -- the bench (parent) ------------------------------------------------------------------------

class Child:
    """The server child: its output lines, marks, CPU and memory."""

    def __init__(self, port: int, symbols: int, rate: float, store: str):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--symbols", str(symbols),
             "--rate", str(rate), "--store", store], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.marks: list[tuple[float, float, float]] = []  # (price, pushed at, push ms)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(600) or self.proc.poll() is not None:
            self.stop()
            raise SystemExit("the server did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            marks = _MARK.findall(line)
            self.marks += [(float(price), float(at), float(ms)) for _, price, at, ms in marks]
            line = _MARK.sub("", line).rstrip()
            if line:
                self.lines.append(line)
            if line.startswith("ready "):
                self.ready.set()

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(x.split()[1]) for x in status if x.startswith("VmRSS:")) / 1024

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Interrupt the server (it closes its flow and writer), killing it after 30 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def measure(child: Child, seconds: float, pump) -> tuple[float, float]:
    """Return the server's CPU (% of one core) over ``seconds`` and its median RSS (MB)."""
    rss, cpu0, t0 = [], child.cpu_s(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        rss.append(child.rss_mb())
        pump(1.0)
    return 100 * (child.cpu_s() - cpu0) / (time.monotonic() - t0), statistics.median(rss)


def first_paints(browser, url: str, n: int) -> dict[str, dict[str, list[float]]]:
    """Per page, ``n`` loads' times (ms from navigation start): ``cold`` and ``warm`` paints,
    and of the cold loads ``html`` (the page's HTML received: the server has built the
    session's document by then) and ``scripts`` (``DOMContentLoaded``: BokehJS and Panel's
    bundles loaded)."""
    out = {}
    for page_name in PAGES:
        times: dict[str, list[float]] = {"cold": [], "warm": [], "html": [], "scripts": []}
        for _ in range(n):
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.add_init_script(_PAINT_JS)
            page = context.new_page()
            for key in ("cold", "warm"):
                page.goto(f"{url}?page={page_name}", wait_until="commit", timeout=60_000)
                page.wait_for_function("() => window.__tf_paint !== undefined",
                                       timeout=120_000)
                times[key].append(page.evaluate("() => window.__tf_paint"))
                if key == "cold":
                    nav = page.evaluate("() => performance.getEntriesByType('navigation')[0]"
                                        ".toJSON()")
                    times["html"].append(nav["responseEnd"])
                    times["scripts"].append(nav["domContentLoadedEventEnd"])
            context.close()
            time.sleep(1.0)
        out[page_name] = times
    return out


def clock_offset(page) -> tuple[float, float]:
    """Return (browser epoch ms - Python epoch ms, uncertainty ms) from the tightest of ten
    round trips."""
    best = None
    for _ in range(10):
        t0 = time.time()
        browser_ms = page.evaluate("() => performance.timeOrigin + performance.now()")
        t1 = time.time()
        if best is None or t1 - t0 < best[1]:
            best = (browser_ms - 500 * (t0 + t1), t1 - t0)
    return best[0], 500 * best[1]


def latencies(child: Child, page, since: float, offset_ms: float) -> tuple[list[float], int]:
    """Return the flow-to-browser latencies (ms) of the marks pushed after ``since`` (epoch s),
    and how many of them the page never showed."""
    seen = {float(k): v for k, v in page.evaluate("() => window.__tf_seen").items()}
    out, missed = [], 0
    for price, at, _ in child.marks:
        if at < since or at > time.time() - 3:  # the newest may still be on its way
            continue
        if price in seen:
            out.append(seen[price] - offset_ms - 1000 * at)
        else:
            missed += 1
    return out, missed


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def fmt_ms(values: list[float]) -> str:
    return (f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
            if values else "—")


def run(args: argparse.Namespace) -> None:
    import panel.models  # noqa: F401  (the client sessions decode Panel's models)
    from conftest import CHROMIUM, CHROMIUM_ARGS, free_port
    from playwright.sync_api import sync_playwright
    from test_load import ClientSession

    import dashboards.app  # noqa: F401  (and the app's own, PageTitle)

    counts = sorted({int(x) for x in args.sessions.split(",") if int(x) > 0})
    store = tempfile.mkdtemp(prefix="bench-dashboard-")
    t_start = time.time()
    load_before = os.getloadavg()
    child = Child(free_port(), args.symbols, args.rate, str(Path(store) / "market.zarr"))
    print(f"server ready (pid {child.proc.pid}); load average {load_before}", flush=True)
    rows: list[tuple] = []
    clients: list[ClientSession] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                        headless=True)
            # Warm-up: each page once (imports, numba, caches), then first paints.
            first_paints(browser, child.url, 1)
            paints = first_paints(browser, child.url, args.paints)
            for name, t in paints.items():
                print(f"first paint {name:8s} cold {fmt_ms(t['cold'])} ms (HTML "
                      f"{fmt_ms(t['html'])}, scripts {fmt_ms(t['scripts'])}), warm "
                      f"{fmt_ms(t['warm'])} ms", flush=True)

            context = browser.new_context(viewport={"width": 1400, "height": 900})
            latency_page = context.new_page()
            pump = lambda s: latency_page.wait_for_timeout(1000 * s)
            time.sleep(4)  # the paint sessions are discarded
            cpu0, rss0 = measure(child, args.window, time.sleep)
            rows.append(("live", 0, cpu0, rss0, None))
            print(f"0 sessions: server CPU {cpu0:.1f} %, RSS {rss0:.0f} MB", flush=True)

            latency_page.goto(f"{child.url}?page=candles&symbol={MARKER}&tf=1m",
                              wait_until="load", timeout=60_000)
            latency_page.wait_for_function(_READY_JS, arg=["candles", "close"], timeout=120_000)
            latency_page.evaluate(_WATCH_CLOSE_JS)
            offset, uncertainty = clock_offset(latency_page)
            extra_pages = []
            plan = [list(PAGES)[i % len(PAGES)] for i in range(max(counts))]
            open_now = 1
            for count in counts:
                while open_now < count:
                    name = plan[open_now]
                    if args.browser_sessions:
                        page = context.new_page()
                        page.goto(f"{child.url}?page={name}", wait_until="load",
                                  timeout=60_000)
                        page.wait_for_function(_READY_JS, arg=list(PAGES[name]),
                                               timeout=180_000)
                        extra_pages.append(page)
                    else:
                        client = ClientSession(child.url, name, {"page": name})
                        client.start()
                        client.ready.wait(180)
                        if client.error is not None:
                            raise SystemExit(f"client session failed: {client.error!r}")
                        clients.append(client)
                    open_now += 1
                pump(5.0)
                since = time.time()
                cpu, rss = measure(child, args.window, pump)
                lat, missed = latencies(child, latency_page, since, offset)
                rows.append(("live", count, cpu, rss, (lat, missed)))
                print(f"{count} sessions: server CPU {cpu:.1f} %, RSS {rss:.0f} MB; latency "
                      f"p50 {pct(lat, 50):.0f} ms, p95 {pct(lat, 95):.0f} ms "
                      f"(n={len(lat)}, missed {missed}, clock ±{uncertainty:.1f} ms)", flush=True)
            if args.profile:
                child.send(f"profile {args.window}")
                pump(args.window + 3)

            # Quiet: the market and the markers stop; what do open sessions cost then?
            child.send("pause")
            pump(5.0)
            cpu_q, rss_q = measure(child, args.window, pump)
            rows.append(("quiet", max(counts), cpu_q, rss_q, None))
            print(f"{max(counts)} sessions, quiet: server CPU {cpu_q:.1f} %", flush=True)
            for client in clients:
                client.leave()
            for client in clients:
                client.join(30)
            for page in extra_pages:
                page.close()
            context.close()
            browser.close()
            time.sleep(5)  # discarded after 2 s
            cpu_q0, rss_q0 = measure(child, args.window, time.sleep)
            rows.append(("quiet", 0, cpu_q0, rss_q0, None))
            per_quiet = (cpu_q - cpu_q0) / max(counts)
            print(f"0 sessions, quiet: server CPU {cpu_q0:.1f} %", flush=True)
    finally:
        for client in clients:
            client.leave()
        child.stop()
        shutil.rmtree(store, ignore_errors=True)
    begin = [i for i, line in enumerate(child.lines) if "profile-begin" in line]
    end = [i for i, line in enumerate(child.lines) if "profile-end" in line]
    profile = "\n".join(child.lines[begin[0] + 1:end[0]]) if begin and end else ""
    report(args, rows, paints, per_quiet, profile, t_start, load_before)


def report(args, rows, paints, per_quiet, profile, t_start, load_before) -> None:
    load_after = os.getloadavg()
    print(f"\n## Dashboard (`bench/bench_dashboard.py {' '.join(sys.argv[1:])}`)\n")
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t_start))} UTC, "
          f"`nproc` = {os.cpu_count()}, load average {load_before[0]:.1f} before / "
          f"{load_after[0]:.1f} after (1 min); {args.symbols} simulated symbols at "
          f"{args.rate:.0f} trades/s; other sessions: "
          f"{'Chromium pages' if args.browser_sessions else 'Bokeh client sessions'}.\n")
    print("| page | first paint, cold: median (min-max) | of which HTML received | scripts "
          "loaded | warm (reload) | target < 2 s |")
    print("|---|---|---|---|---|---|")
    for name, t in paints.items():
        verdict = "met" if t["cold"] and statistics.median(t["cold"]) < 2000 else "missed"
        print(f"| {name} | {fmt_ms(t['cold'])} ms | {fmt_ms(t['html'])} ms | "
              f"{fmt_ms(t['scripts'])} ms | {fmt_ms(t['warm'])} ms | {verdict} |")
    base = {kind: cpu for kind, n, cpu, _, _ in rows if n == 0}
    rss_base = next(rss for kind, n, _, rss, _ in rows if kind == "live" and n == 0)
    print("\n| open sessions | market | server CPU (% of a core) | per session | RSS MB | "
          "per session | update latency p50 / p95 (n, missed) |")
    print("|---|---|---|---|---|---|---|")
    for kind, n, cpu, rss, lat in rows:
        per = f"{(cpu - base[kind]) / n:+.2f}" if n else "—"
        per_rss = f"{(rss - rss_base) / n:+.1f}" if n and kind == "live" else "—"
        latency = (f"{pct(lat[0], 50):.0f} / {pct(lat[0], 95):.0f} ms ({len(lat[0])}, {lat[1]})"
                   if lat else "—")
        print(f"| {n} | {kind} | {cpu:.1f} | {per} | {rss:.0f} | {per_rss} | {latency} |")
    if per_quiet is not None:
        verdict = "met" if per_quiet < 1.0 else "missed"
        print(f"\nIdle (quiet market) cost per open session: {per_quiet:.2f} % of a core "
              f"(target < 1 %: {verdict}).")
    if profile:
        print("\n### Server IOLoop profile with the sessions open\n\n```\n" + profile + "\n```")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 paints per page and 12 s windows (a smoke run, ~5 min)")
    parser.add_argument("--sessions", default="1,5,20", help="open-session counts to measure")
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--rate", type=float, default=2000.0, help="simulated trades/s")
    parser.add_argument("--paints", type=int, default=None, help="loads per page (default 7)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds each session count is held (default 60)")
    parser.add_argument("--browser-sessions", action="store_true",
                        help="the other sessions are Chromium pages, not Bokeh clients")
    parser.add_argument("--profile", action="store_true",
                        help="profile the server's IOLoop thread with the sessions open")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve_child(args.serve, args.symbols, args.rate, args.store)
        return
    args.paints = args.paints or (3 if args.quick else 7)
    args.window = args.window or (12.0 if args.quick else 60.0)
    run(args)


if __name__ == "__main__":
    main()
