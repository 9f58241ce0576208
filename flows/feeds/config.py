"""Several venue feeds into one flow, described in a YAML file (``tapeflow run --config``).

The file lists the feeds under ``feeds``; each entry names its ``venue`` and that venue's
settings::

    feeds:
      - venue: binance
        kind: spot                 # or usdm (USDT-M futures); default spot
        symbols: [btcusdt, ethusdt]
      - venue: coinbase
        symbols: [BTC-USD]
        url: ws://127.0.0.1:9000   # optional: another endpoint than the venue's public one
      - venue: polygon
        symbols: ["*"]             # tickers, or * for every one
        key_env: POLYGON_API_KEY   # the environment variable holding the API key
        bars: true                 # also the AM minute aggregates
      - venue: psx
        url: https://dps.psx.com.pk/market-watch
        interval_s: 5              # seconds between polls of the board
        sectors: psx_sector_codes.csv   # optional sector-code CSV (relative to this file)

:func:`load_feeds` checks everything before anything starts -- unknown venues and keys, missing
or malformed symbols, bad intervals, an API key variable that is not set -- and names the file,
the entry and the key in a one-line :class:`~flows.feeds.FeedError`. :func:`start_feeds` starts
them all into one flow (each registers its health with the flow and pushes under its own feed
name); with several feeds ``flow.feed_state`` summarises them (:func:`summarise_states`).
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.feeds import FeedError

__all__ = ["VENUES", "FeedSpec", "load_feeds", "parse_feeds", "start_feeds", "summarise_states"]

#: Venues a config can name.
VENUES = ("binance", "coinbase", "polygon", "psx")
_KEYS: dict[str, tuple[str, ...]] = {
    "binance": ("kind", "symbols", "url"),
    "coinbase": ("symbols", "url"),
    "polygon": ("symbols", "url", "key_env", "bars"),
    "psx": ("url", "interval_s", "sectors"),
}
_KINDS = ("spot", "usdm")


@dataclass(frozen=True)
class FeedSpec:
    """One feed of a config file, validated.

    Parameters
    ----------
    venue : one of :data:`VENUES`.
    symbols : Binance symbols (``btcusdt``), Coinbase product ids (``BTC-USD``) or Polygon
        tickers (``AAPL``, ``*``); empty for PSX, whose board lists every symbol.
    url : the endpoint; None for the venue's public one.
    kind : Binance ``spot`` or ``usdm``.
    key_env : Polygon: the environment variable holding the API key.
    bars : Polygon: also subscribe the ``AM`` minute aggregates.
    interval_s : PSX: seconds between polls.
    sectors : PSX: a sector-code CSV (code -> sector name).

    Examples
    --------
    >>> FeedSpec("binance", ("btcusdt",)).name, FeedSpec("coinbase", ("BTC-USD",)).name
    ('binance-spot', 'coinbase')
    """

    venue: str
    symbols: tuple[str, ...] = ()
    url: str | None = None
    kind: str = "spot"
    key_env: str = "POLYGON_API_KEY"
    bars: bool = False
    interval_s: float = 5.0
    sectors: str | None = None

    @property
    def name(self) -> str:
        """The feed's name in health reports and quality scores (``binance-spot``, ``coinbase``)."""
        return f"binance-{self.kind}" if self.venue == "binance" else self.venue


def load_feeds(path: str | os.PathLike) -> list[FeedSpec]:
    """Read and validate a feeds YAML file.

    Raises
    ------
    FeedError
        One line naming the file, the entry (``feeds[1] (coinbase)``) and what is wrong.
    """
    p = Path(path)
    if not p.exists():
        raise FeedError(f"{p}: no such file")
    if not p.is_file():
        raise FeedError(f"{p}: not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FeedError(f"{p}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FeedError(f"{p}: not valid YAML ({where}{problem})") from None
    return parse_feeds(doc, source=str(p), base=p.parent)


def parse_feeds(doc: Any, source: str = "config", base: Path | None = None,
                env: Mapping[str, str] | None = None) -> list[FeedSpec]:
    """Validate an already-parsed config (``{"feeds": [...]}``); see :func:`load_feeds`.

    Examples
    --------
    >>> specs = parse_feeds({"feeds": [{"venue": "binance", "symbols": "btcusdt, ethusdt"},
    ...                                {"venue": "psx", "interval_s": 10}]})
    >>> [(s.name, s.symbols, s.interval_s) for s in specs]
    [('binance-spot', ('btcusdt', 'ethusdt'), 5.0), ('psx', (), 10.0)]
    >>> parse_feeds({"feeds": [{"venue": "coinbase", "symbol": ["BTC-USD"]}]}, "feeds.yaml")
    Traceback (most recent call last):
    ...
    flows.feeds.FeedError: feeds.yaml: feeds[0] (coinbase): unknown key 'symbol' (allowed: symbols, url)
    """
    env = os.environ if env is None else env
    if not isinstance(doc, dict) or "feeds" not in doc:
        raise FeedError(f"{source}: expected a top-level 'feeds:' list of feeds")
    extra = [k for k in doc if k != "feeds"]
    if extra:
        raise FeedError(f"{source}: unknown top-level key {extra[0]!r} (expected only 'feeds')")
    entries = doc["feeds"]
    if not isinstance(entries, list) or not entries:
        raise FeedError(f"{source}: 'feeds' must be a non-empty list of feeds")
    specs = [_spec(entry, f"{source}: feeds[{i}]", base, env) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise FeedError(f"{source}: feeds[{i}] ({spec.venue}): a second {spec.name} feed "
                            f"(feeds[{seen[spec.name]}]); list all its symbols in one entry")
        seen[spec.name] = i
    return specs


def _spec(entry: Any, where: str, base: Path | None, env: Mapping[str, str]) -> FeedSpec:
    if not isinstance(entry, dict):
        raise FeedError(f"{where}: expected a mapping with a 'venue' key, got {entry!r}")
    venue = entry.get("venue")
    if venue is None:
        raise FeedError(f"{where}: missing key 'venue' (one of {', '.join(VENUES)})")
    if venue not in VENUES:
        raise FeedError(f"{where}: unknown venue {venue!r} (choose {', '.join(VENUES)})")
    where = f"{where} ({venue})"
    allowed = _KEYS[venue]
    for key in entry:
        if key != "venue" and key not in allowed:
            raise FeedError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")
    out: dict[str, Any] = {"venue": venue}
    if "url" in entry:
        out["url"] = _url(entry["url"], venue, where)
    if venue != "psx":
        if "symbols" not in entry:
            raise FeedError(f"{where}: missing key 'symbols'")
        out["symbols"] = _symbols(entry["symbols"], venue, where)
    if "kind" in entry:
        if entry["kind"] not in _KINDS:
            raise FeedError(f"{where}: kind must be {' or '.join(_KINDS)}, got {entry['kind']!r}")
        out["kind"] = entry["kind"]
    if venue == "binance":
        from flows.feeds.binance import stream_names
        _venue_check(stream_names, out["symbols"], venue, where)
    if "bars" in entry:
        if not isinstance(entry["bars"], bool):
            raise FeedError(f"{where}: bars must be true or false, got {entry['bars']!r}")
        out["bars"] = entry["bars"]
    if venue == "polygon":
        key_env = entry.get("key_env", FeedSpec.key_env)
        if not isinstance(key_env, str) or not key_env.strip():
            raise FeedError(f"{where}: key_env must name an environment variable, got {key_env!r}")
        if not env.get(key_env, "").strip():
            raise FeedError(f"{where}: environment variable {key_env} (key_env) is not set; "
                            "export the API key or remove this feed")
        out["key_env"] = key_env
    if "interval_s" in entry:
        value = entry["interval_s"]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and value > 0
        if not ok:
            raise FeedError(f"{where}: interval_s must be a positive number of seconds, got {value!r}")
        out["interval_s"] = float(value)
    if "sectors" in entry:
        sectors = entry["sectors"]
        if not isinstance(sectors, str) or not sectors.strip():
            raise FeedError(f"{where}: sectors must be the path of a sector-code CSV, got {sectors!r}")
        path = Path(sectors)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise FeedError(f"{where}: sectors: {path}: no such file")
        out["sectors"] = str(path)
    return FeedSpec(**out)


def _url(value: Any, venue: str, where: str) -> str:
    schemes = ("http://", "https://") if venue == "psx" else ("ws://", "wss://")
    if not isinstance(value, str) or not value.startswith(schemes):
        raise FeedError(f"{where}: url must start with {' or '.join(schemes)}, got {value!r}")
    return value


def _symbols(value: Any, venue: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise FeedError(f"{where}: symbols must be a list of names, got {value!r}")
    names = tuple(s.strip() for s in value if s.strip())
    if not names:
        raise FeedError(f"{where}: symbols is empty")
    if venue == "coinbase":
        from flows.feeds.coinbase import product_ids
        _venue_check(product_ids, names, venue, where)
    elif venue == "polygon":
        from flows.feeds.polygon import channel_names
        _venue_check(channel_names, names, venue, where)
    return names


def _venue_check(check, names: Sequence[str], venue: str, where: str) -> None:
    """Run a venue's own symbol check; its message loses the venue prefix (``where`` has it)."""
    try:
        check(list(names))
    except FeedError as exc:
        text = str(exc)
        raise FeedError(f"{where}: {text.removeprefix(venue + ': ')}") from None


# --------------------------------------------------------------------------- running them

def _start(flow, spec: FeedSpec, config):
    extra = {} if config is None else {"config": config}
    if spec.venue == "binance":
        from flows.feeds.binance import start_binance
        return start_binance(flow, list(spec.symbols), url=spec.url, kind=spec.kind, **extra)
    if spec.venue == "coinbase":
        from flows.feeds.coinbase import start_coinbase
        return start_coinbase(flow, list(spec.symbols), url=spec.url, **extra)
    if spec.venue == "polygon":
        from flows.feeds.polygon import start_polygon
        return start_polygon(flow, list(spec.symbols), url=spec.url,
                             key=os.environ.get(spec.key_env), bars=spec.bars, **extra)
    from flows.feeds.psx import DEFAULT_URL, start_psx
    return start_psx(flow, url=spec.url or DEFAULT_URL, interval_s=spec.interval_s,
                     sectors=spec.sectors)


def start_feeds(flow, specs: Sequence[FeedSpec], config=None) -> list:
    """Start every feed of ``specs`` into ``flow``; return them in order.

    ``config`` (a :class:`~flows.feeds.connection.ConnectionConfig`) overrides the websocket
    feeds' connection settings. If one fails to start, those already started are stopped and
    the error raised. With several feeds a small thread keeps ``flow.feed_state`` the
    :func:`summarise_states` of their states until all have ended.
    """
    feeds: list = []
    try:
        for spec in specs:
            feeds.append(_start(flow, spec, config))
    except BaseException:
        for feed in feeds:
            feed.stop()
        raise
    if len(feeds) > 1:
        threading.Thread(target=_follow_states, args=(flow, feeds), name="tapeflow-feed-states",
                         daemon=True).start()
    return feeds


def _follow_states(flow, feeds: list, every_s: float = 0.2) -> None:
    names = {feed.tracker.feed if hasattr(feed, "tracker") else feed.name for feed in feeds}
    while True:
        alive = any(feed.is_alive() for feed in feeds)
        states = {h["feed"]: h["state"] for h in flow.feed_healths() if h["feed"] in names}
        flow.feed_state = summarise_states(states)
        if not alive:
            return
        time.sleep(every_s)


def summarise_states(states: Mapping[str, str]) -> str:
    """One state for several feeds: the shared one when all agree, else each feed's.

    Examples
    --------
    >>> summarise_states({"binance-spot": "LIVE", "coinbase": "LIVE"})
    'LIVE'
    >>> summarise_states({"binance-spot": "LIVE", "coinbase": "BACKOFF"})
    'binance-spot LIVE · coinbase BACKOFF'
    """
    distinct = set(states.values())
    if len(distinct) == 1:
        return distinct.pop()
    return " · ".join(f"{name} {state}" for name, state in states.items())
