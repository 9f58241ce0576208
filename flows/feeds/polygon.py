"""Polygon-style stocks websocket: ``T`` trades, ``AM`` minute aggregates and status messages.

The protocol: after connecting the server sends ``[{"ev":"status","status":"connected",...}]``;
the client sends :func:`auth_message` and, once ``auth_success`` arrives,
:func:`subscribe_message`. Every frame is a JSON array of events of mixed kinds.
:class:`PolygonParser` is pure -- no I/O -- so the shared websocket layer calls it per frame.

``T`` events become trades. Their ``i`` (trade id) is unique per symbol *and exchange* only, so
it cannot serve as our per-symbol ``trade_id``; ``q`` (the per-symbol sequence number, unique and
increasing) does, and is used when present -- otherwise ``trade_id`` is ``NO_ID`` and the
trade is never taken for a duplicate. ``c`` (sale conditions) and ``x`` (exchange) are not used.

``AM`` events become a :class:`~flows.schema.BarBatch` of 1m bars in ``info["bars"]``
(feed them with ``Flow.push_bars("1m", ...)``): ``s`` is the bar's open time. Polygon gives no
trade count (``z`` is the *average* trade size), so ``trades`` is 0, "unknown".
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flows.schema import NO_ID, BarBatch, Quarantine, SymbolTable, TradeBatch

__all__ = ["FATAL_STATUSES", "PolygonParser", "auth_message", "subscribe_message"]

_MS = 1_000_000
_MAX_MS = (2**63 - 1) // _MS
#: Statuses after which reconnecting with the same key cannot succeed.
FATAL_STATUSES = frozenset({"auth_failed"})


def auth_message(key: str) -> dict[str, str]:
    """Return the authentication message (send it as JSON once connected).

    Examples
    --------
    >>> auth_message("KEY")
    {'action': 'auth', 'params': 'KEY'}
    """
    if not isinstance(key, str) or not key.strip():
        raise ValueError("an API key is required for Polygon (set it with --api-key or the env)")
    return {"action": "auth", "params": key.strip()}


def subscribe_message(channels: Sequence[str] = ("T.*", "AM.*")) -> dict[str, str]:
    """Return the subscribe message for ``channels`` (``T.AAPL``, ``AM.*``, ...).

    Examples
    --------
    >>> subscribe_message()
    {'action': 'subscribe', 'params': 'T.*,AM.*'}
    """
    if isinstance(channels, str):
        channels = [c for c in channels.split(",")]
    channels = [c.strip() for c in channels if c.strip()]
    if not channels:
        raise ValueError("subscribe to at least one channel such as 'T.*'")
    return {"action": "subscribe", "params": ",".join(channels)}


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _ms_to_ns(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected epoch ms, got {type(value).__name__}")
    if not -_MAX_MS < value < _MAX_MS:  # also rejects NaN
        raise ValueError(f"epoch ms {value} out of range")
    return int(value) * _MS if isinstance(value, int) else round(value * _MS)


def _symbol(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("sym must be non-empty text")
    return value.strip()


def _raw(event: Any) -> str:
    if isinstance(event, (bytes, bytearray)):
        return bytes(event).decode("utf-8", "replace")
    if isinstance(event, str):
        return event
    try:
        return json.dumps(event, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(event)[:500]


class PolygonParser:
    """Turn Polygon-style frames into trades (``T``), 1m bars (``AM``) and status info.

    Parameters
    ----------
    symbols : the flow's symbol table.

    :meth:`parse` returns ``(trades, quarantine, info)``; ``info`` may hold

    - ``bars``: a :class:`BarBatch` of the frame's ``AM`` events (1m bars);
    - ``status``: the status events, ``[{"status": ..., "message": ...}]``, in order;
    - ``authenticated``: True after ``auth_success`` (send the subscription then);
    - ``fatal``: a message when a status means retrying cannot help (``auth_failed``);
    - ``ignored``: events of other kinds, by ``ev``.

    Examples
    --------
    A frame in the documented format (``T`` and ``AM`` field lists of Polygon's stocks
    websocket reference)::

        [{"ev":"T","sym":"MSFT","x":4,"i":"12345","z":3,"p":114.125,"s":100,"c":[0,12],
          "t":1536036818784,"q":3681328},
         {"ev":"AM","sym":"GTE","v":4110,"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,
          "c":0.4486,"h":0.4489,"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,
          "e":1610144700000}]

    >>> p = PolygonParser(SymbolTable())
    >>> frame = ('[{"ev":"T","sym":"MSFT","x":4,"i":"12345","z":3,"p":114.125,"s":100,'
    ...          '"c":[0,12],"t":1536036818784,"q":3681328},{"ev":"AM","sym":"GTE","v":4110,'
    ...          '"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,"c":0.4486,"h":0.4489,'
    ...          '"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,"e":1610144700000}]')
    >>> trades, bad, info = p.parse(frame, recv_ns=0)
    >>> trades.time.tolist(), trades.trade_id.tolist(), info["bars"].close.tolist(), len(bad)
    ([1536036818784000000], [3681328], [0.4486], 0)
    >>> p.parse('[{"ev":"status","status":"auth_failed","message":"authentication failed"}]',
    ...         recv_ns=0)[2]["fatal"]
    'auth_failed: authentication failed'
    """

    def __init__(self, symbols: SymbolTable):
        self.symbols = symbols
        self.authenticated = False

    def parse(self, frame: list | dict | str | bytes, recv_ns: int
              ) -> tuple[TradeBatch, Quarantine, dict[str, Any]]:
        """Parse one frame (an array of events, or a single event) received at ``recv_ns``."""
        info: dict[str, Any] = {}
        trades: list[tuple] = []
        bars: list[tuple] = []
        bad: list[tuple[str, str]] = []
        try:
            if isinstance(frame, (bytes, bytearray, memoryview)):
                frame = bytes(frame).decode("utf-8")
            events = json.loads(frame) if isinstance(frame, str) else frame
        except (UnicodeDecodeError, ValueError, RecursionError):
            events = []
            bad.append((_raw(frame), "malformed"))
        if not isinstance(events, list):
            events = [events]
        for ev in events:
            self._event(ev, trades, bars, bad, info)
        if trades:
            cols = list(zip(*trades))
            batch = TradeBatch.from_columns(self.symbols, symbol=cols[0], time=cols[1],
                                            price=cols[2], size=cols[3], trade_id=cols[4],
                                            recv_time=recv_ns)
        else:
            batch = TradeBatch()
        if bars:
            cols = list(zip(*bars))
            info["bars"] = BarBatch.from_columns(self.symbols, symbol=cols[0], time=cols[1],
                                                 open=cols[2], high=cols[3], low=cols[4],
                                                 close=cols[5], volume=cols[6], vwap=cols[7])
        quarantine = Quarantine.concat([Quarantine.malformed([r], why) for r, why in bad])
        return batch, quarantine, info

    __call__ = parse

    def _event(self, ev: Any, trades: list, bars: list, bad: list, info: dict) -> None:
        if not isinstance(ev, dict) or not isinstance(ev.get("ev"), str):
            bad.append((_raw(ev), "malformed"))
            return
        kind = ev["ev"]
        try:
            if kind == "T":
                q = ev.get("q")
                trade_id = q if isinstance(q, int) and not isinstance(q, bool) and \
                    0 <= q < 2**62 else NO_ID
                trades.append((_symbol(ev["sym"]), _ms_to_ns(ev["t"]), _number(ev["p"]),
                               _number(ev["s"]), trade_id))
            elif kind == "AM":
                vw = ev.get("vw")
                bars.append((_symbol(ev["sym"]), _ms_to_ns(ev["s"]), _number(ev["o"]),
                             _number(ev["h"]), _number(ev["l"]), _number(ev["c"]),
                             _number(ev["v"]), float("nan") if vw is None else _number(vw)))
            elif kind == "status":
                self._status(ev, info)
            else:
                ignored = info.setdefault("ignored", {})
                ignored[kind] = ignored.get(kind, 0) + 1
        except KeyError:
            bad.append((_raw(ev), "missing_field"))
        except (TypeError, ValueError, OverflowError):
            bad.append((_raw(ev), "malformed"))

    def _status(self, ev: dict, info: dict) -> None:
        status, message = str(ev.get("status", "")), str(ev.get("message", ""))
        info.setdefault("status", []).append({"status": status, "message": message})
        if status == "auth_success":
            self.authenticated = info["authenticated"] = True
        elif status in FATAL_STATUSES:
            self.authenticated = info["authenticated"] = False
            info["fatal"] = f"{status}: {message}" if message else status
