"""Alerts: rules evaluated on bars and indicators, fired once per edge, kept in a log, emitted on a stream.

A rule watches one column (a bar field, an indicator, or ``quality``) of one symbol -- or of
every symbol, ``*`` -- on one timeframe. The one-line form, used by the CLI and the dashboards::

    SYMBOL FIELD OP RHS [on TF] [cooldown DURATION] [once] [forming] [since TIME]
    SYMBOL [FIELD] pct_change WINDOW OP NUMBER [on TF] [...]

``OP`` is ``crosses_above``, ``crosses_below``, ``>``, ``<``, ``>=`` or ``<=``; ``RHS`` is a number,
a column, or ``Nx COLUMN`` (N times a column: ``volume > 3x volume_sma_20`` is a volume spike);
``pct_change WINDOW`` compares the percent change of ``FIELD`` (default ``close``) over a time
window. Durations are ``90s``, ``15m``, ``4h``, ``2d``; the timeframe defaults to ``1m``.

Semantics (named once here; the tests check each):

* **Edges, not levels.** A rule fires on a symbol's bar when its condition is true there and was
  false on the symbol's previous bar with a value (rows where the symbol has no bar, or the
  inputs are NaN, are skipped). A condition that stays true fires once. The first value of a
  series never fires: there is no earlier value to cross from, so a restart or a newly loaded
  window cannot fire on a level that was already reached. ``crosses_above X`` is the edge of
  ``> X`` and ``crosses_below X`` the edge of ``< X``.
* **Closed bars.** Rows flagged provisional (the forming bar) are skipped unless the rule says
  ``forming``; a skipped row is evaluated by a later call once it has closed, even if that call's
  ``start`` is past it. A ``forming`` rule may fire on a bar that later closes below the level;
  a fired alert is never taken back.
* **Once per (rule, symbol, bar time).** Re-evaluating rows (amended bars, a restart) never fires
  the same key twice; an amendment that creates a new edge fires it then.
* **Cooldown** is bar (event) time, per (rule, symbol): a bar within ``cooldown`` of a bar that
  fired does not fire. **once** rules fire once per symbol, ever (a ``*`` rule once for each
  symbol). Replays are deterministic: no wall clock is involved.
* **since**: a rule added at runtime applies to bars from the newest bar of its timeframe on,
  so adding a rule does not fire on the history in memory (nor after a restart: the time is kept
  in its text).

State (fired keys, cooldowns, spent once-rules) is rebuilt from the :class:`AlertLog` (JSON lines,
one alert a line) when an engine starts, so a restart replaying the same bars fires nothing new.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from streamz import Stream

from flows.schema import NS, TIMEFRAMES

log = logging.getLogger(__name__)

OPS = ("crosses_above", "crosses_below", ">", "<", ">=", "<=")
_COMPARE = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal,
            "crosses_above": np.greater, "crosses_below": np.less}
_WORDS = {"crosses_above": "crossed above", "crosses_below": "crossed below"}
_UNITS = {"s": NS, "m": 60 * NS, "h": 3600 * NS, "d": 86400 * NS, "w": 7 * 86400 * NS}
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_FACTOR = re.compile(r"^([0-9.eE+-]+)x$")
#: Columns a rule may name: bar fields, indicators (any period), quality and its components.
_FIELD = re.compile(r"^(open|high|low|close|volume|trades|vwap|vwap_session|macd|macd_signal|macd_hist"
                    r"|bb_upper|bb_middle|bb_lower|stoch_k|stoch_d|quality(_[a-z0-9_]+)?"
                    r"|(sma|ema|rsi|atr|adx|volume_sma)_\d+)$")
#: Rows before the first evaluated one that are scanned for each symbol's previous value; a
#: symbol without a value there is re-scanned from the first row.
LOOKBACK = 64


# -- rules ------------------------------------------------------------------------------------


def parse_duration(text: str | float) -> int:
    """Return a duration (``"15m"``, ``"4h"``; a number means seconds) in nanoseconds.

    Examples
    --------
    >>> parse_duration("15m") // NS, parse_duration(90) // NS
    (900, 90)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not np.isfinite(text) or text < 0:
            raise ValueError(f"bad duration {text!r}")
        return int(round(text * NS))
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"bad duration {text!r} (expected a number and a unit s/m/h/d/w, e.g. 15m)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_duration(ns: int) -> str:
    """Return the shortest text :func:`parse_duration` reads back as ``ns``."""
    for unit in ("w", "d", "h", "m"):
        if ns and ns % _UNITS[unit] == 0:
            return f"{ns // _UNITS[unit]}{unit}"
    return f"{ns // NS}s"


def _fmt_number(x: float) -> str:
    text = repr(float(x))
    return text.removesuffix(".0")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad {what} {text!r} (expected a number)") from None
    if not np.isfinite(value):
        raise ValueError(f"bad {what} {text!r} (must be finite)")
    return value


def _time(text) -> int:
    """Return ns since the epoch of an ISO-8601 text (UTC unless it says otherwise) or a date."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return int(text)
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError):
        stamp = pd.NaT
    if stamp is pd.NaT:
        raise ValueError(f"bad time {text!r} (expected ISO-8601, e.g. 2024-03-01T09:30)")
    return int((stamp.tz_convert("UTC") if stamp.tzinfo else stamp).value)


def _iso(t: int) -> str:
    t = int(t)
    return np.datetime_as_string(np.datetime64(t, "ns"), unit="s" if t % NS == 0 else "ns") + "Z"


@dataclass(frozen=True)
class Rule:
    """One alert rule; build it with :meth:`parse` (text or dict) and print it with :attr:`text`.

    Parameters
    ----------
    symbol : a symbol, or ``"*"`` for every symbol.
    field : the watched column (``close``, ``rsi_14``, ``volume``, ``quality``, ...).
    op : one of :data:`OPS`.
    level : the number compared with; with ``ref``, the multiplier of that column.
    ref : a column compared with (``level * ref``), or None.
    window : ns; when set, the watched value is the percent change of ``field`` since the
        symbol's last bar at or before ``window`` earlier.
    tf : timeframe of the bars evaluated.
    cooldown : ns of bar time after a firing during which the rule does not fire again (per symbol).
    once : fire once per symbol, ever.
    on_forming : also evaluate the forming (provisional) bar.
    since : bar time (ns) from which the rule applies; None for all bars.

    Examples
    --------
    >>> rule = Rule.parse("* rsi_14 > 70 on 5m cooldown 15m")
    >>> rule.kind, rule.cooldown // NS, rule.text
    ('threshold', 900, '* rsi_14 > 70 on 5m cooldown 15m')
    >>> Rule.parse("BTCUSDT pct_change 5m > 2").text
    'BTCUSDT pct_change 5m > 2 on 1m'
    """

    symbol: str
    field: str
    op: str
    level: float
    ref: str | None = None
    window: int = 0
    tf: str = "1m"
    cooldown: int = 0
    once: bool = False
    on_forming: bool = False
    since: int | None = None

    def __post_init__(self) -> None:
        if not self.symbol or any(c.isspace() for c in self.symbol):
            raise ValueError(f"bad symbol {self.symbol!r}")
        for column in (self.field, self.ref):
            if column is not None and not _FIELD.match(column):
                raise ValueError(f"unknown column {column!r} (expected a bar field, an indicator "
                                 f"such as rsi_14 or volume_sma_20, or quality)")
        if self.op not in OPS:
            raise ValueError(f"unknown operator {self.op!r} (expected one of {', '.join(OPS)})")
        if self.tf not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {self.tf!r} (expected one of {', '.join(TIMEFRAMES)})")
        if not np.isfinite(self.level):
            raise ValueError(f"bad level {self.level!r} (must be finite)")
        if self.window < 0 or self.cooldown < 0:
            raise ValueError("window and cooldown must not be negative")
        if self.ref is not None and self.window:
            raise ValueError("pct_change compares with a number, not a column")

    @property
    def kind(self) -> str:
        """``cross``, ``pct_change``, ``volume_spike``, ``quality`` or ``threshold``."""
        if self.window:
            return "pct_change"
        if self.op.startswith("crosses"):
            return "cross"
        if self.field == "volume" and self.ref is not None:
            return "volume_spike"
        return "quality" if self.field.startswith("quality") else "threshold"

    @property
    def condition(self) -> str:
        """The rule's text without ``since``: what it watches. Its hash is :attr:`id`."""
        if self.window:
            head = f"{self.symbol} " + ("" if self.field == "close" else f"{self.field} ")
            body = f"pct_change {format_duration(self.window)} {self.op} {_fmt_number(self.level)}"
        else:
            head = f"{self.symbol} {self.field} "
            if self.ref is None:
                body = f"{self.op} {_fmt_number(self.level)}"
            elif self.level == 1:
                body = f"{self.op} {self.ref}"
            else:
                body = f"{self.op} {_fmt_number(self.level)}x {self.ref}"
        tail = f" on {self.tf}"
        tail += f" cooldown {format_duration(self.cooldown)}" if self.cooldown else ""
        tail += " once" if self.once else ""
        tail += " forming" if self.on_forming else ""
        return head + body + tail

    @property
    def text(self) -> str:
        """The canonical one-line form; ``Rule.parse(rule.text) == rule``."""
        return self.condition + ("" if self.since is None else f" since {_iso(self.since)}")

    @functools.cached_property
    def id(self) -> str:
        """A stable id: the hash of :attr:`condition` (state in the log is keyed by it)."""
        return hashlib.sha1(self.condition.encode()).hexdigest()[:12]

    @classmethod
    def parse(cls, spec: str | Mapping | Rule) -> Rule:
        """Build a rule from its one-line text or a dict; raise ValueError naming the problem."""
        if isinstance(spec, Rule):
            return spec
        try:
            return cls._from_dict(spec) if isinstance(spec, Mapping) else cls._from_text(str(spec))
        except ValueError as exc:
            shown = spec if isinstance(spec, str) else dict(spec) if isinstance(spec, Mapping) else spec
            raise ValueError(f"bad alert rule {shown!r}: {exc}") from None

    @classmethod
    def _from_text(cls, text: str) -> Rule:
        tokens = text.split()
        if len(tokens) < 4:
            raise ValueError("expected 'SYMBOL FIELD OP VALUE [on TF] [cooldown D] [once] [forming]'")
        kw: dict = {"symbol": tokens[0]}
        rest = tokens[1:]
        if "pct_change" in rest[:2]:
            i = rest.index("pct_change")
            kw["field"] = rest[0] if i == 1 else "close"
            if len(rest) < i + 4:
                raise ValueError("expected 'pct_change WINDOW OP NUMBER'")
            kw["window"] = parse_duration(rest[i + 1])
            kw["op"], kw["level"] = rest[i + 2], _number(rest[i + 3], "level")
            rest = rest[i + 4 :]
        else:
            kw["field"], kw["op"] = rest[0], rest[1]
            rhs, rest = rest[2], rest[3:]
            factor = _FACTOR.match(rhs)
            if factor:
                if not rest:
                    raise ValueError(f"{rhs!r} needs a column after it (e.g. {rhs} volume_sma_20)")
                kw["level"], kw["ref"], rest = _number(factor.group(1), "multiplier"), rest[0], rest[1:]
            elif re.match(r"^[+-]?[0-9.]", rhs):
                kw["level"] = _number(rhs, "level")
            else:
                kw["level"], kw["ref"] = 1.0, rhs
        i = 0
        while i < len(rest):
            word = rest[i]
            if word in ("on", "cooldown", "since"):
                if i + 1 >= len(rest):
                    raise ValueError(f"{word!r} needs a value")
                value = rest[i + 1]
                if word == "on":
                    kw["tf"] = value
                elif word == "cooldown":
                    kw["cooldown"] = parse_duration(value)
                else:
                    kw["since"] = _time(value)
                i += 2
            elif word in ("once", "forming"):
                kw["once" if word == "once" else "on_forming"] = True
                i += 1
            else:
                raise ValueError(f"unexpected {word!r} (expected on, cooldown, once, forming or since)")
        return cls(**kw)

    @classmethod
    def _from_dict(cls, spec: Mapping) -> Rule:
        if "rule" in spec:  # {"rule": "one-line text"}
            extra = set(spec) - {"rule"}
            if extra:
                raise ValueError(f"unknown key {sorted(extra)[0]!r} beside 'rule'")
            return cls._from_text(str(spec["rule"]))
        known = {"symbol", "field", "op", "level", "ref", "window", "tf", "cooldown", "once",
                 "on_forming", "since"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(known))})")
        missing = {"symbol", "op"} - set(spec) | ({"level"} - set(spec) if not spec.get("ref") else set())
        if missing:
            raise ValueError(f"missing key {sorted(missing)[0]!r}")
        kw = dict(spec)
        kw.setdefault("field", "close")
        kw["level"] = _number(str(kw.get("level", 1.0)), "level")
        for key in ("window", "cooldown"):
            if key in kw:
                kw[key] = parse_duration(kw[key])
        if kw.get("since") is not None:
            kw["since"] = _time(kw["since"])
        kw["symbol"] = str(kw["symbol"])
        return cls(**kw)


def load_rules(path: str | os.PathLike) -> list[Rule]:
    """Read rules from a YAML file: ``rules:`` followed by one-line texts or dicts."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    specs = doc.get("rules", []) if isinstance(doc, dict) else doc
    if not isinstance(specs, list):
        raise ValueError(f"{path}: expected a list under 'rules'")
    return [Rule.parse(s) for s in specs]


def save_rules(path: str | os.PathLike, rules: Iterable[Rule]) -> None:
    """Write rules as YAML (one-line texts), replacing the file atomically."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# tapeflow alert rules (see flows/alerts.py for the one-line form)\n"
    text += yaml.safe_dump({"rules": [r.text for r in rules]}, sort_keys=False, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- alerts and their log ---------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One fired alert. Times are int64 ns UTC; ``time`` is the bar's open time."""

    rule_id: str
    rule: str
    kind: str
    symbol: str
    tf: str
    time: int
    value: float
    threshold: float
    message: str
    fired_at: int

    def to_dict(self) -> dict:
        """JSON-ready fields (times as ISO-8601 with nanoseconds, NaN as null)."""
        d = asdict(self)
        d["time"], d["fired_at"] = _iso(self.time), _iso(self.fired_at)
        for k in ("value", "threshold"):
            d[k] = None if not np.isfinite(d[k]) else d[k]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Alert:
        return cls(**{**d, "time": _time(d["time"]), "fired_at": _time(d["fired_at"]),
                      "value": np.nan if d["value"] is None else float(d["value"]),
                      "threshold": np.nan if d["threshold"] is None else float(d["threshold"])})


class AlertLog:
    """Fired alerts as JSON lines, appended (one alert a line) and read back on start.

    A line cut short by a crash is skipped when reading (and counted in :attr:`skipped`).
    Put it in the store's writer folder (``writer_dir(store) / "alerts.jsonl"``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.skipped = 0

    def append(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(a.to_dict(), allow_nan=False) + "\n" for a in alerts)
        with open(self.path, "ab") as fh:
            if fh.tell() and _last_byte(self.path) != b"\n":
                lines = "\n" + lines  # end a line a crash cut short, so it alone is lost
            fh.write(lines.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[Alert]:
        """Every alert in the log, in the order fired."""
        self.skipped = 0
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                out.append(Alert.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                self.skipped += 1
        return out


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


# -- the engine -------------------------------------------------------------------------------


class AlertEngine:
    """Evaluate rules on bar rows; keep, log and emit what fires. Thread-safe.

    Parameters
    ----------
    rules : rules (or their texts/dicts).
    clock : returns "now" (int ns) for :attr:`Alert.fired_at`; None uses the newest bar time
        evaluated, so replays are deterministic.
    log : an :class:`AlertLog` (or its path) to append to; its alerts rebuild the state.
    rules_path : a YAML file :meth:`add_rule` / :meth:`remove_rule` keep up to date.
    recent : how many alerts :attr:`recent` keeps for the dashboards.

    Examples
    --------
    >>> engine = AlertEngine(["* close crosses_above 10 on 1m"])
    >>> seen = engine.stream.sink_to_list()
    >>> times = np.arange(3, dtype=np.int64) * 60 * NS
    >>> close = np.array([[9.0, 11.0], [11.0, 12.0], [12.0, 9.0]])
    >>> [a.symbol for a in engine.evaluate("1m", times, {"close": close}, ["A", "B"])]
    ['A']
    >>> seen[0].message
    'A close crossed above 10 at 11 (1m bar 1970-01-01T00:01:00Z)'
    """

    def __init__(self, rules: Iterable[Rule | str | Mapping] = (), clock: Callable[[], int] | None = None,
                 log: AlertLog | str | os.PathLike | None = None, rules_path: str | os.PathLike | None = None,
                 recent: int = 1000):
        self._lock = threading.RLock()
        self.clock = clock
        self.log = log if isinstance(log, AlertLog) or log is None else AlertLog(log)
        self.rules_path = None if rules_path is None else Path(rules_path)
        self._rules: dict[str, Rule] = {}
        for spec in rules:
            rule = Rule.parse(spec)
            self._rules[rule.id] = rule
        #: fired bar times per (rule id, symbol), sorted; pruned as rows leave the window.
        self._fired: dict[tuple[str, str], list[int]] = {}
        self._spent: set[tuple[str, str]] = set()
        self._pending: dict[str, int] = {}  # tf -> first provisional row time left unevaluated
        self._newest: dict[str, int] = {}
        self._oldest: dict[str, int] = {}
        #: the latest alerts, oldest first (the dashboards' table).
        self.recent: deque[Alert] = deque(maxlen=recent)
        #: streamz source emitting each fired :class:`Alert`.
        self.stream = Stream(stream_name="alerts")
        #: bumped whenever alerts fire or rules change.
        self.version = 0
        #: (rule id, column) pairs skipped because the column was not among the values.
        self.missing: set[tuple[str, str]] = set()
        if self.log is not None:
            for alert in self.log.read():
                self._remember(alert)
                self.recent.append(alert)

    @classmethod
    def open(cls, rules_path: str | os.PathLike, log_path: str | os.PathLike, **kw) -> AlertEngine:
        """An engine with the rules of ``rules_path`` (if it exists) and the state of ``log_path``."""
        path = Path(rules_path)
        rules = load_rules(path) if path.exists() else []
        return cls(rules, log=AlertLog(log_path), rules_path=path, **kw)

    # -- rules --------------------------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        with self._lock:
            return tuple(self._rules.values())

    def add_rule(self, spec: Rule | str | Mapping) -> Rule:
        """Add a rule (replacing one with the same condition) and return it as stored.

        Without an explicit ``since``, it applies from the newest bar of its timeframe seen so
        far, so the history in memory does not fire.
        """
        rule = Rule.parse(spec)
        with self._lock:
            if rule.since is None and rule.tf in self._newest:
                rule = replace(rule, since=self._newest[rule.tf])
            self._rules[rule.id] = rule
            self._changed_rules()
        return rule

    def remove_rule(self, rule: Rule | str) -> bool:
        """Remove a rule (a Rule, its id, or its text); return whether it was there.

        Its fired history is kept: re-adding the same condition does not re-arm a spent
        ``once`` rule (change the rule to get a fresh one).
        """
        with self._lock:
            if isinstance(rule, str) and rule in self._rules:
                rid = rule
            else:
                rid = Rule.parse(rule).id
            if self._rules.pop(rid, None) is None:
                return False
            self._changed_rules()
            return True

    def _changed_rules(self) -> None:
        self.version += 1
        if self.rules_path is not None:
            save_rules(self.rules_path, self._rules.values())

    # -- state ----------------------------------------------------------------------------------

    def _remember(self, alert: Alert) -> None:
        key = (alert.rule_id, alert.symbol)
        bisect.insort(self._fired.setdefault(key, []), alert.time)
        self._spent.add(key)

    def _prune(self, tf: str, oldest: int) -> None:
        """Forget fired times no longer needed: rows before ``oldest`` are never evaluated again."""
        if self._oldest.get(tf, oldest - 1) >= oldest:
            return
        self._oldest[tf] = oldest
        cooldown = {rid: r.cooldown for rid, r in self._rules.items() if r.tf == tf}
        for key, fired in list(self._fired.items()):
            if key[0] in cooldown:
                cut = bisect.bisect_left(fired, oldest - cooldown[key[0]])
                if cut == len(fired):
                    del self._fired[key]
                elif cut:
                    del fired[:cut]

    def _allowed(self, rule: Rule, symbol: str, t: int) -> bool:
        key = (rule.id, symbol)
        if rule.once and key in self._spent:
            return False
        fired = self._fired.get(key)
        if not fired:
            return True
        i = bisect.bisect_left(fired, t)
        if i < len(fired) and fired[i] == t:
            return False  # this bar already fired
        if rule.cooldown:
            near = [fired[j] for j in (i - 1, i) if 0 <= j < len(fired)]
            if any(abs(t - f) < rule.cooldown for f in near):
                return False
        return True

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, tf: str, times: np.ndarray, values: Mapping[str, np.ndarray],
                 symbols: Sequence[str], start: int = 0, provisional: np.ndarray | None = None,
                 emit: bool = True) -> list[Alert]:
        """Evaluate rows ``start:`` of timeframe ``tf``; log, keep and emit the alerts that fire.

        Parameters
        ----------
        tf : the timeframe of these rows; only its rules are evaluated.
        times : sorted bar open times (R,), int64 ns or datetime64[ns].
        values : columns by name, each (R, S') with S' <= S (missing symbols are NaN). With
            ``trades`` present, rows where a symbol has ``trades == 0`` are its non-bars.
        symbols : the S symbol names of the columns.
        start : first row that is new or changed since the last call for ``tf``.
        provisional : (R,) bool, True for the forming bar; None means every row is closed.
        emit : emit the alerts on :attr:`stream` (pass False and call :meth:`emit` to emit
            outside a caller's lock).

        Returns
        -------
        The alerts fired, ordered by bar time, then rule, then symbol.
        """
        times = np.asarray(times).view(np.int64)
        n = len(times)
        provisional = np.zeros(n, bool) if provisional is None else np.asarray(provisional, bool)
        fired: list[tuple[int, int, int, Alert]] = []
        with self._lock:
            if n == 0:
                return []
            lo = max(0, min(int(start), n))
            if tf in self._pending:
                lo = min(lo, int(np.searchsorted(times, self._pending.pop(tf))))
            if provisional[lo:].any():
                self._pending[tf] = int(times[lo + int(np.argmax(provisional[lo:]))])
            self._newest[tf] = max(self._newest.get(tf, times[-1]), int(times[-1]))
            self._prune(tf, int(times[0]))
            now = int(self.clock()) if self.clock is not None else int(times[-1])
            index = {s: i for i, s in enumerate(symbols)}
            for order, rule in enumerate(self._rules.values()):
                if rule.tf != tf:
                    continue
                for r, c, value, threshold in self._edges(rule, times, values, symbols, index, lo, provisional):
                    symbol = symbols[c]
                    t = int(times[r])
                    if self._allowed(rule, symbol, t):
                        alert = _alert(rule, symbol, t, value, threshold, now)
                        self._remember(alert)
                        fired.append((t, order, c, alert))
            fired.sort(key=lambda x: x[:3])
            alerts = [a for *_, a in fired]
            if alerts:
                if self.log is not None:
                    self.log.append(alerts)
                self.recent.extend(alerts)
                self.version += 1
        if emit:
            self.emit(alerts)
        return alerts

    def emit(self, alerts: Sequence[Alert]) -> None:
        """Emit alerts on :attr:`stream` (and so to every subscriber)."""
        for alert in alerts:
            self.stream.emit(alert)

    def subscribe(self, callback: Callable[[Alert], object]) -> Stream:
        """Call ``callback(alert)`` for each alert fired; return the sink (``.destroy()`` it to stop).

        Callbacks run on the thread that evaluates (the flow's flusher): keep them short.
        """
        return self.stream.sink(callback)

    def _edges(self, rule: Rule, times: np.ndarray, values: Mapping[str, np.ndarray],
               symbols: Sequence[str], index: dict[str, int], lo: int, provisional: np.ndarray):
        """Yield (row, column, value, threshold) of each edge of ``rule`` in rows ``lo:``."""
        for name in (rule.field, rule.ref):
            if name is not None and name not in values:
                if (rule.id, name) not in self.missing:
                    self.missing.add((rule.id, name))
                    log.warning("alert rule %r: no column %r on %s", rule.text, name, rule.tf)
                return
        n = len(times)
        if rule.symbol == "*":
            cols = np.arange(len(symbols))
        elif rule.symbol in index:
            cols = np.array([index[rule.symbol]])
        else:
            return
        first = lo
        if rule.since is not None:
            first = max(first, int(np.searchsorted(times, rule.since)))
        evaluable = ~provisional if not rule.on_forming else np.ones(n, bool)
        if first >= n or not evaluable[first:].any() or not len(cols):
            return
        base = first
        if rule.window:
            base = max(0, int(np.searchsorted(times, times[first] - rule.window, side="right")) - 1)
        base = max(0, base - LOOKBACK)
        edge, lhs, rhs, unresolved = _edges(rule, times, values, cols, base, first)
        if unresolved.any():  # symbols quiet over the look-back: scan them from the first row
            e2, l2, r2, _ = _edges(rule, times, values, cols[unresolved], 0, first)
            lhs = lhs.copy()  # it may be a view of the caller's values
            edge[:, unresolved], lhs[:, unresolved], rhs[:, unresolved] = e2, l2, r2
        edge &= evaluable[first:, None]
        for r, c in zip(*np.nonzero(edge)):
            yield first + int(r), int(cols[c]), float(lhs[r, c]), float(rhs[r, c])


def _column(values: Mapping[str, np.ndarray], name: str, cols: np.ndarray, base: int) -> np.ndarray:
    """Rows ``base:`` of column ``name`` for symbol columns ``cols`` as float64 (NaN beyond its width)."""
    arr = np.asarray(values[name])[base:]
    width = arr.shape[1] if arr.ndim == 2 else 0
    if len(cols) and cols[-1] < width and len(cols) == cols[-1] - cols[0] + 1:
        return arr[:, cols[0] : cols[-1] + 1].astype(np.float64, copy=False)
    out = np.full((len(arr), len(cols)), np.nan)
    ok = cols < width
    out[:, ok] = arr[:, cols[ok]]
    return out


def _last_index(mask: np.ndarray) -> np.ndarray:
    """For each row, the last row at or before it where ``mask`` is True (-1 when none)."""
    idx = np.where(mask, np.arange(len(mask))[:, None], -1)
    return np.maximum.accumulate(idx, axis=0) if len(idx) else idx


def _edges(rule: Rule, times: np.ndarray, values: Mapping[str, np.ndarray], cols: np.ndarray,
           base: int, first: int) -> tuple[np.ndarray, ...]:
    """Edges of ``rule`` in rows ``first:`` for symbol columns ``cols``, looking back to row ``base``.

    Returns (edge, value, threshold), each (rows from ``first``, columns), and per column whether
    an answer needed a row before ``base`` (then scan again from row 0).
    """
    x = _column(values, rule.field, cols, base)
    present = _column(values, "trades", cols, base) > 0 if "trades" in values else True
    unknown = np.zeros(x.shape, bool)  # values that depend on rows before base
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if rule.window:
            has_x = present & np.isfinite(x)
            last = _last_index(has_x)
            ref_row = np.searchsorted(times, times[base:] - rule.window, side="right") - 1 - base
            src = np.where(ref_row[:, None] >= 0, last[np.maximum(ref_row, 0)], -1)
            ref = np.where(src >= 0, x[np.maximum(src, 0), np.arange(x.shape[1])], np.nan)
            if base:
                unknown = (src < 0) & (ref_row[:, None] >= -base) & has_x
            lhs = (x / ref - 1.0) * 100.0
        else:
            lhs = x
        rhs = (rule.level * _column(values, rule.ref, cols, base) if rule.ref is not None
               else np.full(x.shape, rule.level))
        valid = present & np.isfinite(lhs) & np.isfinite(rhs)
        cond = _COMPARE[rule.op](lhs, rhs) & valid
    # Each row's previous row with a value (or with an unknown one), for rows from first on.
    t0 = first - base
    last = _last_index(valid | unknown)
    prev = np.full((len(x) - t0, x.shape[1]), -1)
    prev[1:] = last[t0:-1]
    if t0:
        prev[0] = last[t0 - 1]
    has_prev = prev >= 0
    at = (np.maximum(prev, 0), np.arange(x.shape[1]))
    prev_cond, prev_unknown = cond[at], unknown[at]
    cond, unknown_tail = cond[t0:], unknown[t0:]
    edge = cond & has_prev & ~prev_cond & ~prev_unknown
    unresolved = (((cond | unknown_tail) & (~has_prev | prev_unknown)) | unknown_tail).any(axis=0)
    return edge, lhs[t0:], rhs[t0:], unresolved & (base > 0)


def _alert(rule: Rule, symbol: str, t: int, value: float, threshold: float, now: int) -> Alert:
    v, thr = f"{value:.6g}", f"{threshold:.6g}"
    if rule.window:
        what = f"{symbol} {rule.field} changed {value:+.3g}% over {format_duration(rule.window)} ({rule.op} {thr}%)"
    elif rule.op in _WORDS:
        target = rule.ref if rule.ref is not None and rule.level == 1 else thr
        what = f"{symbol} {rule.field} {_WORDS[rule.op]} {target} at {v}"
    elif rule.ref is not None:
        times_ref = rule.ref if rule.level == 1 else f"{_fmt_number(rule.level)}x {rule.ref}"
        what = f"{symbol} {rule.field} {v} {rule.op} {times_ref} ({thr})"
    else:
        what = f"{symbol} {rule.field} {v} {rule.op} {thr}"
    message = f"{what} ({rule.tf} bar {_iso(t)})"
    return Alert(rule.id, rule.text, rule.kind, symbol, rule.tf, t, value, threshold, message, max(now, t))


def analytics_values(analytics, tf: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Return (times, values, provisional) of ``tf`` from a refreshed :class:`flows.analytics.Analytics`:
    the bar fields and every indicator as (R, S) views, for :meth:`AlertEngine.evaluate`."""
    from flows.analytics import frame_fields

    frame = analytics.engine.frames[tf]
    values = frame_fields(frame, len(analytics.table))
    out = analytics.indicators[tf].outputs()
    provisional = out.pop("provisional")
    values.update(out)
    times = frame.times[: frame.n]
    if getattr(analytics, "quality", None) is not None:  # quality rules: score and components
        q = analytics.quality.dataset(tf, analytics.table.names)
        q = q.reindex(time=times.view("datetime64[ns]"))
        for name, var in q.data_vars.items():
            if var.dims == ("time", "symbol"):
                values["quality" if name == "score" else f"quality_{name}"] = var.values.astype(np.float64)
    return times, values, provisional
