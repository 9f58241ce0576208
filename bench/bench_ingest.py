"""Ingest: Binance aggTrade frames over a loopback websocket -> parse -> validate -> bars.

``python bench/bench_ingest.py [--seconds 10] [--quick] [--symbols 200] [--rate 100000] [--profile]``

A tornado websocket server in its own process (pinned to another core than the client, so it
does not steal the client's) sends Binance combined-stream ``@aggTrade`` frames, pre-encoded
before the clock starts, built from the real captures in ``tests/data`` (their prices, sizes,
sides and ``l - f`` spans) with symbols and ids varied: ``--symbols`` symbols, each with its own
increasing aggregate and raw trade ids, event time advancing 1 ms per 100 frames.

The client is the production path on one core: :class:`~flows.feeds.binance.BinanceFeed` (its
tornado reader thread and consumer thread, one process pinned to one CPU) into a
:class:`~flows.pipeline.Flow` with ``store=None`` and analytics off, all six timeframes.

Printed:

* **parse ceilings**, measured in the same run on the same frames: ``json.loads``,
  ``orjson.loads`` and msgspec decoding into typed structs, per frame; and our own stages
  without a socket -- ``BinanceFeed.parse`` alone, then parse -> validate -> bars in one
  thread (frames batched as the feed's consumer batches them).
* **end to end**: a lossless burst (the server sends as fast as the socket takes it; the
  client's queue holds every frame) -- frames/s from the first frame received to the last
  trade in its bars; the share of the msgspec ceiling it reaches.
* **receive-to-bar latency** at paced rates (``--rate``, default 100k trades/s, and half the
  measured end-to-end capacity): from the frame's receipt (its ``recv_time``, stamped by the
  feed as the frame comes off the socket) to the return of ``flow.push`` for the batch
  holding the trade (the open bar reflects it) -- p50, p99, p99.9, max, and frames dropped
  by the feed's bounded queue.

One aggTrade frame carries one aggregate trade, so trades/s equals frames/s here.
``--profile`` adds a cProfile of every client thread during the burst (top functions).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec
import orjson

from flows.feeds.binance import BinanceFeed
from flows.feeds.connection import ConnectionConfig
from flows.pipeline import Flow, FlowConfig
from flows.schema import TIMEFRAMES, Quarantine, SymbolTable, TradeBatch

DATA = ROOT / "tests" / "data"
FRAME = ('{"stream":"%s@aggTrade","data":{"e":"aggTrade","E":%d,"s":"%s","a":%d,"p":"%s",'
         '"q":"%s","f":%d,"l":%d,"T":%d,"m":%s,"M":true}}')
FRAMES_PER_MS = 100


# --------------------------------------------------------------------------- frames

class AggTrade(msgspec.Struct):
    """An aggTrade payload as msgspec decodes it (the typed-struct parse ceiling)."""

    e: str
    E: int
    s: str
    a: int
    p: str
    q: str
    f: int
    l: int  # Binance's field name (the last raw trade id)
    T: int
    m: bool
    M: bool = True


class Frame(msgspec.Struct):
    stream: str
    data: AggTrade


def real_agg_trades() -> list[dict]:
    """The ``data`` of every aggTrade frame of the Binance captures in tests/data."""
    out = []
    for path in sorted(DATA.glob("binance*_ws_combined_*.jsonl")):
        for line in path.read_text().splitlines():
            frame = json.loads(line)["frame"]
            if frame.get("stream", "").endswith("@aggTrade"):
                out.append(frame["data"])
    return out


def make_frames(n: int, n_symbols: int, seed: int = 0, start_ms: int | None = None) -> list[bytes]:
    """``n`` aggTrade frames (UTF-8 text) from the real ones, ``n_symbols`` symbols, ids varied.

    Symbol i is a real base and a number (``YFI7USDT``); each symbol's ``a`` and ``f..l``
    increase without gaps; ``T`` advances 1 ms per :data:`FRAMES_PER_MS` frames and ends now.
    """
    real = real_agg_trades()
    bases = sorted({d["s"].removesuffix("USDT").removesuffix("BTC").removesuffix("BUSD") for d in real})
    names = [f"{bases[i % len(bases)]}{i // len(bases)}USDT" for i in range(n_symbols)]
    lower = [s.lower() for s in names]
    rng = random.Random(seed)
    picks = [rng.randrange(len(real)) for _ in range(n)]
    syms = [rng.randrange(n_symbols) for _ in range(n)]
    if start_ms is None:
        start_ms = int(time.time() * 1000) - n // FRAMES_PER_MS - 1000
    agg = [1_000_000 * (i + 1) for i in range(n_symbols)]
    raw = [5_000_000 * (i + 1) for i in range(n_symbols)]
    out = []
    for k in range(n):
        d, s = real[picks[k]], syms[k]
        span = d["l"] - d["f"]
        f = raw[s]
        raw[s] += span + 1
        agg[s] += 1
        t = start_ms + k // FRAMES_PER_MS
        out.append((FRAME % (lower[s], t + 3, names[s], agg[s], d["p"], d["q"], f, f + span, t,
                             "true" if d["m"] else "false")).encode())
    return out


# --------------------------------------------------------------------------- the server process

def ws_frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked websocket text frame (what a server sends).

    >>> ws_frame(b"hi")
    b'\\x81\\x02hi'
    """
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def server_main(conn, mode: str, n: int, n_symbols: int, rate: float, cpu: int | None) -> None:
    """Serve one websocket client: ``burst`` sends ``n`` frames as fast as the socket takes
    them; ``paced`` sends them at ``rate`` frames/s. Reports ``(sent, seconds)`` on ``conn``."""
    _pin(cpu)
    from tornado.httpserver import HTTPServer
    from tornado.iostream import StreamClosedError
    from tornado.netutil import bind_sockets
    from tornado.web import Application
    from tornado.websocket import WebSocketClosedError, WebSocketHandler

    frames = [ws_frame(f) for f in make_frames(n, n_symbols)]
    sockets = bind_sockets(0, "127.0.0.1")

    class Handler(WebSocketHandler):
        def open(self, *args) -> None:
            asyncio.get_event_loop().create_task(self.play())

        async def play(self) -> None:
            # Whole pre-encoded websocket frames written straight to the stream, many per
            # write: the server spends next to nothing per frame, whatever the client does.
            stream = self.ws_connection.stream
            t0 = time.perf_counter()
            sent = 0
            try:
                while sent < n:
                    if mode == "burst":
                        due = min(n, sent + 256)
                    else:
                        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
                    if due > sent:
                        await stream.write(b"".join(frames[sent:due]))  # the socket's backpressure
                        sent = due
                    if mode != "burst":
                        await asyncio.sleep(0.0002)
            except (WebSocketClosedError, StreamClosedError):
                pass
            conn.send((sent, time.perf_counter() - t0))

    async def main() -> None:
        app = Application([(r"/.*", Handler)], websocket_max_message_size=1 << 20)
        server = HTTPServer(app)
        server.add_sockets(sockets)
        conn.send(sockets[0].getsockname()[1])
        await asyncio.get_event_loop().run_in_executor(None, conn.recv)  # "stop"
        server.stop()

    asyncio.run(main())


class Server:
    """A :func:`server_main` process; ``url`` once listening, ``result()`` after sending."""

    def __init__(self, mode: str, n: int, n_symbols: int, rate: float = 0.0, cpu: int | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=server_main, args=(child, mode, n, n_symbols, rate, cpu),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            raise RuntimeError("bench server did not start")
        self.url = f"ws://127.0.0.1:{self.conn.recv()}"

    def result(self, timeout: float = 600) -> tuple[int, float]:
        if not self.conn.poll(timeout):
            raise RuntimeError("bench server did not finish")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


# --------------------------------------------------------------------------- the client

def new_flow() -> Flow:
    return Flow(FlowConfig(store=None, timeframes=TIMEFRAMES, analytics=False))


class Client:
    """BinanceFeed into a fresh in-memory flow, timing every push."""

    def __init__(self, url: str, queue_frames: int, profile: bool = False, feed_class=BinanceFeed,
                 noop: bool = False):
        self.flow = new_flow()
        self.pushed = 0
        self.first_recv = None
        self.last_push = 0
        self.latency: list[np.ndarray] = []
        self.recv: list[np.ndarray] = []
        self.profiles: list[cProfile.Profile] = []
        self.noop = noop
        config = ConnectionConfig(idle_s=60.0, queue_frames=queue_frames)
        cls = _profiled(feed_class, self.profiles) if profile else feed_class
        self.feed = cls(self.flow.table, ["btcusdt@aggTrade"], self.sink, url=url, config=config)

    def sink(self, batch: TradeBatch, unparsed: Quarantine) -> None:
        if not self.noop:
            self.flow.push(batch, unparsed)
        now = time.time_ns()
        if len(batch):
            if self.first_recv is None:
                self.first_recv = int(batch.recv_time.min())
            self.latency.append(now - batch.recv_time)
            self.recv.append(batch.recv_time)
            self.pushed += len(batch)
        self.last_push = now

    def run_until(self, n: int, timeout: float) -> bool:
        """Run the feed until ``n`` trades reached the bars (or all frames came and some were
        dropped, or ``timeout``). Health snapshots cost about a millisecond: one a second."""
        self.feed.start()
        deadline = time.monotonic() + timeout
        next_health = time.monotonic() + 1.0
        while self.pushed < n and time.monotonic() < deadline and self.feed.failure is None:
            if time.monotonic() >= next_health:
                next_health += 1.0
                h = self.feed.health()
                if h.dropped_frames and h.frames >= n:
                    break
            time.sleep(0.01)
        self.feed.stop()
        return self.pushed >= n


# --------------------------------------------------------------------------- what-if variants
#
# Two changes to flows/feeds/connection.py, prototyped here as subclasses so their effect can
# be measured (``--what-if``); the production path above is measured as it is.

class CallbackReader(BinanceFeed):
    """What-if: tornado hands each frame to ``_on_frame`` from its own frame loop
    (``on_message_callback``) instead of through its ``Queue(1)`` and an ``asyncio.wait`` per
    frame. (No idle timeout or reconnect here: a measurement prototype only.)"""

    async def _attempt(self, stop):
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        from flows.feeds.connection import _Outcome

        closed = asyncio.Event()

        def on_message(message) -> None:
            if message is None:
                closed.set()
            else:
                self._on_frame(message)

        conn = await websocket_connect(HTTPRequest(self.url(self.subscriptions)),
                                       on_message_callback=on_message)
        self.tracker.connected()
        self.tracker.set_state("LIVE")
        ended = asyncio.ensure_future(closed.wait())
        await asyncio.wait([ended, stop], return_when=asyncio.FIRST_COMPLETED)
        conn.close()
        return _Outcome("stopped", healthy=True)


def lingering(cls, linger_s: float = 0.002, most: int = 4096):
    """What-if: the consumer waits up to ``linger_s`` for more frames before pushing, so one
    ``flow.push`` (about 0.3 ms however small the batch) carries many frames."""
    import queue as queue_

    from flows.feeds.connection import _END

    class Lingering(cls):
        def _consume(self):
            while True:
                items = [self._queue.get()]
                deadline = time.monotonic() + linger_s
                while items[-1] is not _END and len(items) < most:
                    left = deadline - time.monotonic()
                    try:
                        items.append(self._queue.get(timeout=left) if left > 0
                                     else self._queue.get_nowait())
                    except queue_.Empty:
                        break
                done = items[-1] is _END
                work = items[:-1] if done else items
                if work:
                    batch = TradeBatch.concat([b for b, _ in work])
                    self.sink(batch, Quarantine.concat([q for _, q in work]))
                    with self._pending_cv:
                        self._pending -= len(work)
                        self._pending_cv.notify_all()
                if done:
                    return

    Lingering.__name__ = f"{cls.__name__} + lingering consumer"
    return Lingering


class BatchedReader(CallbackReader):
    """What-if: the callback reader decodes each frame to a row only; once a millisecond (or
    every 4096 rows) the rows become one TradeBatch, observed by the health tracker and pushed
    into the sink from the same thread -- no per-frame TradeBatch, no consumer thread."""

    def _on_frame(self, message) -> None:
        from flows.feeds.binance import _loads, parse_agg_trade

        rows = self.__dict__.setdefault("_rows", [])
        recv_ns = self.wall_ns()
        self.tracker.frame()
        rows.append(parse_agg_trade(_loads(message)["data"], recv_ns))
        if len(rows) == 1:
            asyncio.get_event_loop().call_later(0.001, self._flush_rows)
        elif len(rows) >= 4096:
            self._flush_rows()

    def _flush_rows(self) -> None:
        from flows.feeds.binance import rows_to_batch

        rows = self.__dict__.get("_rows")
        if rows:
            batch = rows_to_batch(rows, self.table)
            rows.clear()
            self.tracker.observe(batch, int(batch.recv_time[-1]))
            self.sink(batch, Quarantine())


def reader_costs(n: int, n_symbols: int, cpus) -> dict[str, float]:
    """CPU µs per frame of the production reader thread, in layers: its read loop alone
    (frames only counted), then with ``_on_frame`` (parse, health, enqueue) but a consumer that
    never wakes, then as it is beside a consumer pushing into a flow."""
    from flows.feeds.connection import _END

    cpu: dict[str, float] = {}
    got = [0]

    class Timed(BinanceFeed):
        def _read_thread(self):
            t = time.thread_time()
            super()._read_thread()
            cpu[self.layer] = time.thread_time() - t

    class LoopOnly(Timed):
        layer = "loop"

        def _on_frame(self, message):
            got[0] += 1

    class NoConsumer(Timed):
        layer = "on_frame"

        def _on_frame(self, message):
            super()._on_frame(message)
            got[0] += 1

        def _consume(self):  # asleep until the reader is done: it never competes with it
            self._stop.wait()
            while self._queue.get() is not _END:
                pass

    for cls in (LoopOnly, NoConsumer):
        got[0] = 0
        server = Server("burst", n, n_symbols, cpu=cpus[1])
        try:
            feed = cls(SymbolTable(), ["btcusdt@aggTrade"], lambda b, q: None, url=server.url,
                       config=ConnectionConfig(queue_frames=n + 1024, idle_s=60.0))
            feed.start()
            deadline = time.monotonic() + max(120.0, n / 1000)
            while got[0] < n and time.monotonic() < deadline:
                time.sleep(0.01)
            feed.stop()
        finally:
            server.stop()
    return {k: v / n * 1e6 for k, v in cpu.items()}


def what_if(n: int, n_symbols: int, cpus) -> list[tuple[str, dict]]:
    out = []
    for cls in (BinanceFeed, lingering(BinanceFeed), CallbackReader, lingering(CallbackReader),
                BatchedReader):
        server = Server("burst", n, n_symbols, cpu=cpus[1])
        try:
            client = Client(server.url, queue_frames=n + 1024, feed_class=cls)
            c0 = time.process_time()
            client.run_until(n, timeout=max(120.0, n / 1000))
            cpu = time.process_time() - c0
        finally:
            server.stop()
        span = (client.last_push - client.first_recv) / 1e9
        out.append((cls.__name__, {"cpu_us": cpu / client.pushed * 1e6, "rate": client.pushed / span,
                                   "per_push": client.pushed / len(client.latency)}))
    return out


def _profiled(cls, profiles: list):
    """``cls`` whose reader and consumer threads run under cProfile."""

    class Profiled(cls):
        def _read_thread(self):
            p = cProfile.Profile()
            profiles.append(p)
            p.runcall(super()._read_thread)

        def _consume(self):
            p = cProfile.Profile()
            profiles.append(p)
            p.runcall(super()._consume)

    return Profiled


# --------------------------------------------------------------------------- measurements
#
# Single-thread stages are timed in CPU time of the thread (``time.thread_time``) and the
# end-to-end run in CPU time of the client process (``time.process_time``; the server is
# another process): on a shared machine that is what one idle core would take. Wall-clock
# rates are printed beside them; latencies can only be wall-clock.

def cpu_per_item(fn, items: list, min_s: float = 0.3) -> float:
    """CPU seconds per item of ``fn(items)`` (repeated for ``min_s`` of CPU; best of 3)."""
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.thread_time()
        while True:
            fn(items)
            n += len(items)
            spent = time.thread_time() - t0
            if spent >= min_s:
                break
        best = min(best, spent / n)
    return best


def ceilings(frames: list[bytes]) -> dict[str, float]:
    """CPU µs per frame: the JSON decoders, our parser, and our whole path without a socket."""
    text = [f.decode() for f in frames]
    decoder = msgspec.json.Decoder(Frame)
    parser = BinanceFeed(SymbolTable(), ["btcusdt@aggTrade"], sink=lambda b, q: None)

    def loads(items):
        for f in items:
            json.loads(f)

    def oloads(items):
        for f in items:
            orjson.loads(f)

    def typed(items):
        for f in items:
            decoder.decode(f)

    def parse(items):
        for f in items:
            parser.parse(f, 0)

    def pipeline(items):
        # A fresh flow each pass: the same ids again would all be duplicates.
        flow = new_flow()
        p = BinanceFeed(flow.table, ["btcusdt@aggTrade"], sink=lambda b, q: None)
        for i in range(0, len(items), 1024):
            parts = [p.parse(f, 0) for f in items[i:i + 1024]]
            for b, _ in parts:
                p.tracker.frame()
                p.tracker.observe(b, 0)
            flow.push(TradeBatch.concat([b for b, _ in parts]), Quarantine.concat([q for _, q in parts]))

    out = {"json.loads": loads, "orjson.loads": oloads, "msgspec typed structs": typed,
           "BinanceFeed.parse": parse,
           "parse -> health -> validate -> bars, one thread, no socket": pipeline}
    return {name: cpu_per_item(fn, text, 0.0 if fn is pipeline else 0.3) * 1e6
            for name, fn in out.items()}


def breakdown(frames: list[bytes]) -> dict[str, float]:
    """CPU µs per frame of each step a live frame takes, run one after the other in one thread."""
    import queue

    from flows.feeds.health import HealthTracker

    text = [f.decode() for f in frames]
    n = len(text)
    flow = new_flow()
    feed = BinanceFeed(flow.table, ["btcusdt@aggTrade"], sink=lambda b, q: None)
    tracker = HealthTracker("bench")
    q: queue.Queue = queue.Queue()
    out: dict[str, float] = {}
    clock = time.thread_time

    t0 = clock()
    parts = [feed.parse(f, 0) for f in text]
    out["BinanceFeed.parse: decode, check fields, one-row TradeBatch"] = clock() - t0
    t0 = clock()
    for b, _ in parts:
        tracker.frame()
        tracker.observe(b, 0)
    out["health tracker: frame() + observe(batch) per frame"] = clock() - t0
    t0 = clock()
    for item in parts:
        q.put_nowait(item)
    for _ in parts:
        q.get()
    out["hand-off queue: put + get"] = clock() - t0
    t0 = clock()
    batches = [(TradeBatch.concat([b for b, _ in parts[i:i + 1024]]),
                Quarantine.concat([q for _, q in parts[i:i + 1024]])) for i in range(0, n, 1024)]
    out["consumer: concat 1024 one-row batches"] = clock() - t0
    t0 = clock()
    for b, q_ in batches:
        flow.push(b, q_)
    out["flow.push: validate -> bars (6 timeframes), 1024 frames a push"] = clock() - t0
    return {k: v / n * 1e6 for k, v in out.items()}


def push_cost(frames: list[bytes], per_push: float) -> float:
    """CPU µs per frame of ``flow.push`` when each push carries ``per_push`` frames."""
    flow = new_flow()
    feed = BinanceFeed(flow.table, ["btcusdt@aggTrade"], sink=lambda b, q: None)
    parts = [feed.parse(f.decode(), 0) for f in frames]
    k = max(1, round(per_push))
    batches = [(TradeBatch.concat([b for b, _ in parts[i:i + k]]),
                Quarantine.concat([q for _, q in parts[i:i + k]])) for i in range(0, len(parts), k)]
    t0 = time.thread_time()
    for b, q in batches:
        flow.push(b, q)
    return (time.thread_time() - t0) / len(parts) * 1e6


def tornado_ceiling(n: int, n_symbols: int, cpus) -> tuple[float, float]:
    """A bare tornado websocket client counting frames in a callback: the reader's floor
    before any work of ours. Return (CPU µs per frame, wall frames/s)."""
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    server = Server("burst", n, n_symbols, cpu=cpus[1])
    try:
        async def receive() -> tuple[float, float]:
            got = [0]
            done = asyncio.Event()
            t = [0.0, 0.0]

            def on_message(m) -> None:
                if got[0] == 0:
                    t[0], t[1] = time.perf_counter(), time.thread_time()
                got[0] += m is not None
                if got[0] >= n or m is None:
                    done.set()

            conn = await websocket_connect(server.url + "/stream", on_message_callback=on_message)
            await done.wait()
            frames = got[0] - 1
            cpu, wall = time.thread_time() - t[1], time.perf_counter() - t[0]
            conn.close()
            return cpu / frames * 1e6, frames / wall

        return IOLoop(make_current=False).run_sync(receive)
    finally:
        server.stop()


def burst(n: int, n_symbols: int, cpus: tuple[int | None, int | None], profile: bool = False,
          noop: bool = False) -> dict:
    """``n`` frames as fast as they come through the production client (``noop``: into a sink
    that does nothing -- the reader's own cost)."""
    server = Server("burst", n, n_symbols, cpu=cpus[1])
    try:
        client = Client(server.url, queue_frames=n + 1024, profile=profile, noop=noop)
        t0, c0 = time.perf_counter(), time.process_time()
        ok = client.run_until(n, timeout=max(120.0, n / 2000))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sent, send_s = server.result()
    finally:
        server.stop()
    span = (client.last_push - client.first_recv) / 1e9 if client.first_recv else float("nan")
    h = client.feed.health()
    out = {"frames": n, "pushed": client.pushed, "complete": ok, "seconds": span,
           "rate": client.pushed / span, "server_rate": sent / send_s, "wall": wall,
           "cpu_us": cpu / max(client.pushed, 1) * 1e6, "pushes": len(client.latency),
           "dropped": h.dropped_frames, "counters": client.flow.counters.to_dict()}
    if profile:
        out["profile"] = client.profiles
    return out


def paced(rate: float, seconds: float, n_symbols: int, cpus, feed_class=BinanceFeed) -> dict:
    n = int(rate * seconds)
    server = Server("paced", n, n_symbols, rate=rate, cpu=cpus[1])
    try:
        client = Client(server.url, queue_frames=ConnectionConfig().queue_frames, feed_class=feed_class)
        client.run_until(n, timeout=seconds * 1.5 + 5)
        sent, send_s = server.result()
    finally:
        server.stop()
    recv = np.concatenate(client.recv) if client.recv else np.zeros(0, np.int64)
    lat = np.concatenate(client.latency) / 1e6 if client.latency else np.zeros(0)
    warm = recv >= recv.min() + 0.5e9 if len(recv) else recv.astype(bool)  # skip the first 0.5 s
    lat = lat[warm]
    q = np.percentile(lat, [50, 99, 99.9]) if len(lat) else [float("nan")] * 3
    span = (client.last_push - client.first_recv) / 1e9 if client.first_recv else float("nan")
    return {"rate": rate, "sent_rate": sent / send_s, "achieved": client.pushed / span,
            "p50": q[0], "p99": q[1], "p999": q[2], "max": float(lat.max()) if len(lat) else float("nan"),
            "dropped": client.feed.health().dropped_frames, "pushed": client.pushed, "sent": sent}


# --------------------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load[0]:.1f} at start")


def print_profile(profiles: list, top: int = 25) -> None:
    stats = None
    for p in profiles:
        if stats is None:
            stats = pstats.Stats(p, stream=io.StringIO())
        else:
            stats.add(p)
    if stats is None:
        return
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(top)
    print("\nprofile of the client threads during the burst (sorted by own time):")
    print("\n".join(out.getvalue().splitlines()[4:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0,
                   help="length of each paced latency run, and about that of the burst (default 10)")
    p.add_argument("--quick", action="store_true", help="short runs, fewer frames (a smoke test)")
    p.add_argument("--symbols", type=int, default=200, help="symbols the frames spread over")
    p.add_argument("--rate", type=float, default=100_000.0,
                   help="paced latency run, trades/s (default 100000; half the measured "
                        "capacity is run too)")
    p.add_argument("--profile", action="store_true", help="cProfile the client during the burst")
    p.add_argument("--what-if", action="store_true",
                   help="also measure two prototyped connection.py changes (a callback reader, "
                        "a lingering consumer)")
    p.add_argument("--no-pin", action="store_true", help="do not pin client and server to CPUs")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 2.0)

    cpus: tuple[int | None, int | None] = (None, None)
    if not args.no_pin and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        mine = sorted(os.sched_getaffinity(0))
        cpus = (mine[0], mine[1])
        _pin(cpus[0])
    print(f"# ingest benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: {machine()}")
    print(f"client pinned to CPU {cpus[0]}, server to CPU {cpus[1]}" if cpus[0] is not None
          else "client and server not pinned")

    sample = make_frames(20_000 if args.quick else 100_000, args.symbols, seed=1)
    print(f"frames: Binance aggTrade, {args.symbols} symbols, {np.mean([len(f) for f in sample]):.0f} "
          "bytes each on average; one aggregate trade a frame")
    ceil = ceilings(sample)
    steps = breakdown(sample)
    msgspec_us = ceil["msgspec typed structs"]

    # A burst of about --seconds, sized by a short one.
    n_burst = max(20_000, int(burst(5_000, args.symbols, cpus)["rate"] * args.seconds))
    tornado_us, tornado_wall = tornado_ceiling(min(n_burst, 200_000), args.symbols, cpus)
    b = burst(n_burst, args.symbols, cpus, args.profile)
    if not b["complete"]:
        print(f"warning: burst incomplete: {b['pushed']:,} of {b['frames']:,} trades reached the bars")

    print("\nCPU per frame on one core (thread or process CPU time: what an idle core would take)\n")
    print("| stage | CPU µs/frame | frames/s = trades/s | vs msgspec |")
    print("|---|---:|---:|---:|")
    rows = {**ceil, "bare tornado websocket client (receive only)": tornado_us,
            "**end to end: websocket -> parse -> validate -> bars**": b["cpu_us"]}
    for name, us in rows.items():
        print(f"| {name} | {us:.2f} | {1e6 / us:,.0f} | {msgspec_us / us:.1%} |")
    print(f"\nend to end wall clock (load average {os.getloadavg()[0]:.1f}): {b['pushed']:,} frames in "
          f"{b['seconds']:.2f} s = {b['rate']:,.0f}/s (a bare tornado client reads {tornado_wall:,.0f}/s "
          f"from the same server); dropped {b['dropped']:,}; counters {b['counters']}; "
          f"{b['pushes']:,} pushes into the flow ({b['pushed'] / max(b['pushes'], 1):.1f} frames each)")

    layers = reader_costs(min(n_burst, 60_000), args.symbols, cpus)
    per_push = b["pushed"] / max(b["pushes"], 1)
    push_us = push_cost(sample[:20_000], per_push)
    concat_us = steps["consumer: concat 1024 one-row batches"]
    print("\nwhere a frame's CPU goes end to end (layers of the production reader measured in its "
          "thread; the consumer's work alone in one thread)\n")
    print("| layer | CPU µs/frame | share |")
    print("|---|---:|---:|")
    parse_us = steps["BinanceFeed.parse: decode, check fields, one-row TradeBatch"]
    health_us = steps["health tracker: frame() + observe(batch) per frame"]
    rows = {
        "tornado: read and unframe the websocket message (bare client, callback)": tornado_us,
        "reader loop: tornado's Queue(1) hand-off and an asyncio.wait per frame": layers["loop"] - tornado_us,
        f"reader `_on_frame`: parse ({parse_us:.1f} alone), health tracker ({health_us:.1f} alone), "
        "enqueue": layers["on_frame"] - layers["loop"],
        f"consumer: concat + flow.push at {per_push:.1f} frames a push, as end to end "
        f"(at 1024 a push: {steps['flow.push: validate -> bars (6 timeframes), 1024 frames a push'] + concat_us:.1f})":
            concat_us + push_us,
    }
    rows["two threads: GIL hand-overs and wake-ups between reader and consumer (the rest)"] = \
        b["cpu_us"] - sum(rows.values())
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} | {us / b['cpu_us']:.0%} |")
    print(f"| **end to end** | **{b['cpu_us']:.1f}** | 100% |")

    rates = [args.rate, round(1e6 / b["cpu_us"] / 2, -2)]
    print("\nreceive-to-bar latency at paced rates (wall clock)\n")
    print("| offered trades/s | reached bars/s | p50 ms | p99 ms | p99.9 ms | max ms | dropped |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rate in rates:
        r = paced(rate, args.seconds, args.symbols, cpus)
        over = " (overloaded)" if r["achieved"] < 0.95 * rate else ""
        print(f"| {rate:,.0f} | {r['achieved']:,.0f}{over} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['p999']:.2f} | {r['max']:.1f} | {r['dropped']:,} |")
    share = msgspec_us / b["cpu_us"]
    print(f"\ntargets: end to end >= 60% of the msgspec ceiling: {'met' if share >= 0.6 else 'NOT met'} "
          f"({share:.1%}); receive-to-bar p99 < 10 ms at {args.rate:,.0f} trades/s: first latency row")
    if args.what_if:
        print("\nwhat if (prototypes of connection.py changes, same burst)\n")
        print("| client | CPU µs/frame | frames/s on one core | wall frames/s | frames per push |")
        print("|---|---:|---:|---:|---:|")
        results = what_if(min(n_burst, 60_000), args.symbols, cpus)
        for name, r in results:
            print(f"| {name} | {r['cpu_us']:.1f} | {1e6 / r['cpu_us']:,.0f} | {r['rate']:,.0f} | "
                  f"{r['per_push']:.1f} |")
        capacity = 1e6 / results[-1][1]["cpu_us"]
        print("\nreceive-to-bar latency of the BatchedReader prototype (wall clock)\n")
        print("| offered trades/s | reached bars/s | p50 ms | p99 ms | p99.9 ms | max ms | dropped |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for rate in (args.rate, round(capacity / 2, -3)):
            r = paced(rate, args.seconds, args.symbols, cpus, feed_class=BatchedReader)
            over = " (overloaded)" if r["achieved"] < 0.95 * rate else ""
            print(f"| {rate:,.0f} | {r['achieved']:,.0f}{over} | {r['p50']:.2f} | {r['p99']:.2f} | "
                  f"{r['p999']:.2f} | {r['max']:.1f} | {r['dropped']:,} |")
    if args.profile:
        print_profile(b["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
