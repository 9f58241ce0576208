"""The embedded default feed: a seeded synthetic equity market.

The market has ~100 listed companies in eleven sectors. Its tape has the textures a real one has,
so that bars, breadth and quality views have something true-to-life to show:

- log-prices follow a random walk made of a market factor (scaled by each stock's beta), a sector
  factor and an idiosyncratic part;
- volatility clusters: a market regime (calm / normal / turbulent, a Markov chain) scales every
  stock's volatility and activity, and each stock's own log-volatility is a mean-reverting
  (Ornstein-Uhlenbeck) process that is kicked up after a price jump;
- occasional jumps ("news") move one stock by a few percent and trigger a burst of trading;
- trade arrival is Poisson with an intraday U-shape (busy open and close, quiet lunch), plus
  bursts (clusters of trades decaying over a few seconds);
- activity differs widely per stock (heavy-tailed weights; a few stocks are nearly silent);
- trades alternate around the mid by a half-spread (bid-ask bounce), on a 0.01 tick, in round
  lots and odd lots.

Everything is vectorized per block of about one second of event time; the only Python loop is
over the emitted batches. Same ``seed`` and ``start_ns`` give the same trades, bit for bit.
"""
from __future__ import annotations

import math
import time as _time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from flows.feeds import FeedError
from flows.schema import BUY, NS, SELL, SymbolTable, TradeBatch

__all__ = ["MAX_SYMBOLS", "SECTORS", "SimulatedMarket", "listing"]

#: Sectors of the simulated exchange: share of listings, annualized volatility, industry words
#: used to name its companies.
SECTORS: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "Technology": (0.14, 0.34, ("Software", "Semiconductor", "Systems", "Networks", "Data",
                                "Micro Devices", "Cloud", "Digital")),
    "Health Care": (0.12, 0.28, ("Pharmaceuticals", "Biosciences", "Therapeutics", "Medical",
                                 "Health", "Diagnostics", "Genomics")),
    "Financials": (0.13, 0.25, ("Bancorp", "Financial", "Capital", "Insurance", "Trust",
                                "Asset Management", "Payments")),
    "Consumer Discretionary": (0.15, 0.30, ("Retail", "Motors", "Apparel", "Hotels",
                                            "Restaurants", "Brands", "Home Furnishings")),
    "Communication Services": (0.05, 0.30, ("Media", "Communications", "Telecom",
                                            "Entertainment", "Interactive", "Broadcasting")),
    "Industrials": (0.13, 0.24, ("Industries", "Aerospace", "Machinery", "Logistics", "Rail",
                                 "Engineering", "Electric")),
    "Consumer Staples": (0.07, 0.16, ("Foods", "Beverages", "Household Products", "Grocers",
                                      "Tobacco", "Farms")),
    "Energy": (0.06, 0.38, ("Petroleum", "Oil and Gas", "Energy", "Drilling", "Resources",
                            "Pipelines")),
    "Utilities": (0.05, 0.15, ("Power", "Utilities", "Gas and Electric", "Water",
                               "Energy Holdings")),
    "Real Estate": (0.05, 0.22, ("Realty", "Properties", "Land", "Residential", "REIT")),
    "Materials": (0.05, 0.28, ("Chemicals", "Materials", "Mining", "Steel", "Packaging",
                               "Minerals")),
}

_BRANDS = (
    "Apex", "Northwind", "Bluewater", "Harbor", "Summit", "Pinnacle", "Cedar", "Granite",
    "Meridian", "Silverline", "Redwood", "Atlas", "Beacon", "Cobalt", "Crescent", "Delta",
    "Evergreen", "Falcon", "Frontier", "Golden", "Horizon", "Ironwood", "Juniper", "Keystone",
    "Lakeshore", "Liberty", "Magnolia", "Monarch", "Nova", "Oakridge", "Orion", "Pacific",
    "Paragon", "Pioneer", "Quantum", "Radiant", "Ridgeline", "Sable", "Sentinel", "Sierra",
    "Sterling", "Stonebridge", "Sunrise", "Tidewater", "Trident", "Union", "Vanguard", "Vertex",
    "Westfield", "Willow", "Zenith", "Alder", "Arbor", "Aurora", "Bedrock", "Birch", "Boulder",
    "Canyon", "Cardinal", "Cascade", "Centennial", "Clearwater", "Coastal", "Commonwealth",
    "Copper", "Cypress", "Eastgate", "Ember", "Fairview", "Glacier", "Hawthorne", "Heritage",
    "Highland", "Hudson", "Lantern", "Mariner", "Maple", "Mesa", "Midland", "Millbrook",
    "Northstar", "Osprey", "Prairie", "Presidio", "Regent", "Riverbend", "Sequoia", "Shoreline",
    "Skyline", "Thornbury", "Trillium", "Valley", "Wexford", "Windward",
)
#: More brands, drawn on only by listings larger than ``_BRANDS`` alone can name (> 470).
_MORE_BRANDS = (
    "Acorn", "Anchor", "Ashford", "Avalon", "Bayview", "Belmont", "Blackstone", "Bramble",
    "Brookfield", "Buckeye", "Calumet", "Camden", "Capstone", "Carlisle", "Chesapeake",
    "Citadel", "Clarion", "Concord", "Cornerstone", "Cresthaven", "Dakota", "Dominion",
    "Driftwood", "Eagle", "Elmwood", "Emerald", "Equinox", "Fairmont", "Fieldstone", "Foxhall",
    "Gateway", "Greenfield", "Halcyon", "Hampton", "Harvest", "Hillcrest", "Ivory", "Jasper",
    "Kestrel", "Kingsley", "Lakeland", "Landmark", "Laurel", "Lexington", "Lighthouse",
    "Linden", "Marigold", "Marquette", "Meadow", "Merrimack", "Mohawk", "Montclair",
    "Mountain", "Newport", "Nimbus", "Oasis", "Olympic", "Onyx", "Palisade", "Pembroke",
    "Peregrine", "Piedmont", "Polaris", "Prospect", "Quarry", "Rainier", "Raven", "Regal",
    "Riverside", "Rockport", "Rosewood", "Saddleback", "Saratoga", "Seaboard", "Shenandoah",
    "Solstice", "Spruce", "Starling", "Sycamore", "Tahoe", "Talon", "Terrace", "Timber",
    "Topaz", "Tundra", "Twin Oaks", "Upland", "Verdant", "Victory", "Vista", "Walden",
    "Waverly", "Whitestone", "Wildwood", "Woodland", "Yellowstone", "Yukon", "Zephyr",
    "Ardent", "Bristol", "Crown", "Everest", "Galaxy", "Ironclad", "Lumen", "Northgate",
)
#: Words that set a company apart from another of the same brand and industry ("First
#: Harbor Bancorp" beside "Harbor Bancorp"), used only once a brand has every industry of a
#: sector already.
_QUALIFIERS = ("First", "United", "National", "General", "American", "Global", "Allied",
               "Standard", "Premier", "Continental", "International", "Consolidated", "Western",
               "Southern", "Eastern", "Northern", "Royal", "Central", "Republic", "Imperial")
_SUFFIXES = ("Inc.", "Corp.", "Holdings", "Group", "Co.", "Inc.", "Corp.", "Ltd.")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MIN_INDUSTRIES = min(len(v[2]) for v in SECTORS.values())
_FIRST_LISTING_MAX = len(_BRANDS) * _MIN_INDUSTRIES  # 470: the listing's original reach
#: The largest listing: each brand can name a company in every industry of one sector under
#: every qualifier, however the sectors fall.
MAX_SYMBOLS = (len(_BRANDS) + len(_MORE_BRANDS)) * _MIN_INDUSTRIES * (len(_QUALIFIERS) + 1)
_UNIVERSE_SEED = 20_240_614  # the listing is the same for every seed: only the tape changes

# Market regimes: mean dwell time (s), volatility multiplier, activity multiplier.
_REGIME_DWELL = np.array([900.0, 1800.0, 300.0])
_REGIME_VOL = np.array([0.7, 1.0, 2.2])
_REGIME_ACT = np.array([0.8, 1.0, 1.8])
# Leaving a state for a uniformly chosen other state makes the stationary law proportional to
# the dwell times; activity is normalized so the long-run mean rate is ``rate``.
_REGIME_ACT = _REGIME_ACT / float(_REGIME_ACT @ (_REGIME_DWELL / _REGIME_DWELL.sum()))

_TRADING_SECONDS_PER_YEAR = 252 * 23_400
_MARKET_VOL, _SECTOR_VOL = 0.15, 0.10  # annualized factor volatilities
_LOGVOL_TAU, _LOGVOL_SD, _LOGVOL_KICK = 900.0, 0.5, 0.8
_JUMP_RATE, _JUMP_SD = 1 / 23_400.0, 0.015  # per stock per second (~1 a session); log s.d.
_BURST_SHARE, _BURST_MEAN, _BURST_TAU = 0.2, 40.0, 3.0  # share of trades, trades/burst, decay s
_TICK = 0.01


def _ticker(brand: str, industry: str, taken: set[str]) -> str:
    words = brand.split()
    if len(words) > 1:  # "First Harbor": the qualifier's initial leads (FHRB, FHR, FHB)
        return _qualified_ticker(words, industry, taken)
    b = "".join(c for c in brand.upper() if c.isalpha())
    i = "".join(c for c in industry.upper() if c.isalpha())
    consonants = b[0] + "".join(c for c in b[1:] if c not in "AEIOU")
    # Short brands list as themselves (APEX); longer ones by their consonants (CLRW), like
    # real tickers, then with a letter of the industry.
    candidates = [b] if len(b) <= 4 else []
    candidates += [consonants[:4], consonants[:3], consonants[:3] + i[0], b[:3] + i[0],
                   b[0] + consonants[1:3] + i[0], b[:2] + i[:2], b[:4], b[:3]]
    candidates += [b[0] + b[k] + i[0] for k in range(1, len(b))]
    candidates += [b[:2] + c for c in _LETTERS if c != "Q"]
    for c in candidates:
        if 3 <= len(c) <= 4 and c not in taken:
            return c
    return _any_ticker(b[0], taken)


def _qualified_ticker(words: list[str], industry: str, taken: set[str]) -> str:
    q = words[0][0].upper()
    b = "".join(c for c in "".join(words[1:]).upper() if c.isalpha())
    i = "".join(c for c in industry.upper() if c.isalpha())
    consonants = b[0] + "".join(c for c in b[1:] if c not in "AEIOU")
    candidates = [q + consonants[:3], q + consonants[:2], q + b[0] + i[0], q + b[:2] + i[0],
                  q + consonants[:2] + i[0], q + b[0] + i[:2], q + b[:3]]
    candidates += [q + b[0] + c for c in _LETTERS if c != "Q"]
    for c in candidates:
        if 3 <= len(c) <= 4 and c not in taken:
            return c
    return _any_ticker(q, taken)


def _any_ticker(first: str, taken: set[str]) -> str:
    """Return the first free 3-letter, then 4-letter, ticker starting with ``first``."""
    for width in (2, 3):
        for k in range(26**width):
            rest = "".join(_LETTERS[k // 26**p % 26] for p in reversed(range(width)))
            if first + rest not in taken:
                return first + rest
    raise FeedError("simulated market: ticker space exhausted")  # > 18,000 per initial


def listing(n_symbols: int = 100) -> list[dict[str, str]]:
    """Return the simulated exchange's listing: ticker, name and sector of each company.

    The listing depends only on ``n_symbols`` (not on the market's seed), so stores written by
    different runs share their symbols. Up to :data:`MAX_SYMBOLS` (21,000) companies: tickers
    are 3-4 letters and unique, names unique.

    Examples
    --------
    >>> rows = listing(100)
    >>> len(rows), len({r["ticker"] for r in rows}), len({r["sector"] for r in rows})
    (100, 100, 11)
    >>> sorted(rows[0])
    ['name', 'sector', 'ticker']
    """
    if n_symbols < 1:
        raise FeedError(f"simulated market: n_symbols must be at least 1, got {n_symbols}")
    if n_symbols > MAX_SYMBOLS:
        raise FeedError(f"simulated market: n_symbols must be at most {MAX_SYMBOLS}, "
                        f"got {n_symbols}")
    names = list(SECTORS)
    shares = np.array([SECTORS[s][0] for s in names]) * n_symbols
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares, kind="stable")[: n_symbols - counts.sum()]] += 1
    if n_symbols >= len(names):  # every sector listed, taking from the largest
        for k in np.flatnonzero(counts == 0):
            counts[k] += 1
            counts[np.argmax(counts)] -= 1
    # Up to 470 companies the first brands suffice (and those listings stay as they always
    # were); larger ones draw on more brands, and qualify a name only when a brand has run out
    # of a sector's industries.
    pool = _BRANDS if n_symbols <= _FIRST_LISTING_MAX else _BRANDS + _MORE_BRANDS
    rng = np.random.default_rng(_UNIVERSE_SEED)
    brands = rng.permutation(len(pool))  # each brand once before any is reused
    rows: list[dict[str, str]] = []
    taken: set[str] = set()
    prefixes: set[str] = set()  # every leading run of words (with its space) of each name
    k = 0
    for sector, count in zip(names, counts):
        industries = SECTORS[sector][2]
        for _ in range(count):
            brand = pool[brands[k % len(brands)]]
            k += 1
            j = int(rng.integers(len(industries)))
            qualified = brand
            for attempt in range(len(industries) * (len(_QUALIFIERS) + 1)):
                q = attempt // len(industries)
                qualified = brand if q == 0 else f"{_QUALIFIERS[q - 1]} {brand}"
                if f"{qualified} {industries[j]} " not in prefixes:
                    break
                j = (j + 1) % len(industries)
            suffix = _SUFFIXES[rng.integers(len(_SUFFIXES))]
            name = f"{qualified} {industries[j]} {suffix}"
            words = name.split(" ")
            prefixes.update(" ".join(words[:w]) + " " for w in range(1, len(words)))
            ticker = _ticker(qualified, industries[j], taken)
            taken.add(ticker)
            rows.append({"ticker": ticker, "name": name, "sector": sector})
    return rows


class SimulatedMarket:
    """A seeded synthetic equity market emitting :class:`TradeBatch` objects in event time.

    Parameters
    ----------
    symbols : SymbolTable
        The flow's shared table; the market registers its tickers there and sets
        ``symbols.meta[ticker] = {"sector": ..., "name": ..., "exchange": "SIM"}``.
    n_symbols : int
        Number of listed companies.
    rate : float
        Long-run mean number of trades per second of event time, across the market.
    seed : int
        Seed of the tape (prices, arrivals, sizes). The listing does not depend on it.
    start_ns : int, optional
        Event time of the first trade window, ns since the epoch. Default: now, floored to the
        second (the market is then "live": with ``realtime`` its event time is the wall clock).
    batch_ms : int
        Event time covered by each emitted batch.
    realtime : bool
        Sleep so that a batch is emitted when the wall clock reaches its end; else run as fast
        as possible.
    session_s : float
        Length of the trading session whose U-shaped activity repeats back to back from
        ``start_ns`` (6.5 h, like a US equity session, by default).
    clock, sleep : callable
        Wall clock (ns) and sleep (s), injectable for tests.

    Examples
    --------
    >>> table = SymbolTable()
    >>> market = SimulatedMarket(table, n_symbols=20, seed=1, start_ns=1_700_000_000 * NS)
    >>> batches = list(market.batches(duration_s=2.0))
    >>> len(batches), len(table), table.meta[table.names[0]]["exchange"]
    (20, 20, 'SIM')
    >>> bool((TradeBatch.concat(batches).price > 0).all())
    True
    """

    def __init__(
        self,
        symbols: SymbolTable,
        n_symbols: int = 100,
        rate: float = 2000.0,
        seed: int = 0,
        start_ns: int | None = None,
        batch_ms: int = 100,
        realtime: bool = False,
        session_s: float = 23_400.0,
        clock: Callable[[], int] = _time.time_ns,
        sleep: Callable[[float], None] = _time.sleep,
    ):
        if not rate > 0 or not math.isfinite(rate):
            raise FeedError(f"simulated market: rate must be a positive number, got {rate}")
        if not 1 <= batch_ms <= 3_600_000:
            raise FeedError(f"simulated market: batch_ms must be in 1..3600000, got {batch_ms}")
        if not session_s > 0:
            raise FeedError(f"simulated market: session_s must be positive, got {session_s}")
        rows = listing(n_symbols)
        self.symbols = symbols
        self.tickers: tuple[str, ...] = tuple(r["ticker"] for r in rows)
        for r in rows:
            symbols.meta[r["ticker"]] = {"sector": r["sector"], "name": r["name"],
                                         "exchange": "SIM"}
        #: Codes of the market's tickers in ``symbols`` (the table may hold other symbols too).
        self.codes = symbols.codes(list(self.tickers))
        self.rate, self.seed, self.realtime = float(rate), seed, realtime
        self.batch_ns = int(batch_ms) * NS // 1000
        self._live = start_ns is None
        self.start_ns = int(start_ns) if start_ns is not None else clock() // NS * NS
        self._session_ns = int(session_s * NS)
        self._clock, self._sleep = clock, sleep
        # Blocks of ~1 s amortize numpy call overhead over many trades.
        self._per_block = max(1, round(NS / self.batch_ns))
        self._character(rows)
        self._rng = np.random.default_rng(seed)
        self._state()
        self._ready: deque[TradeBatch] = deque()
        self._wall_offset: int | None = 0 if self._live else None

    def _character(self, rows: list[dict[str, str]]) -> None:
        """Draw each stock's stable character (price level, activity, volatility, beta)."""
        rng = np.random.default_rng(_UNIVERSE_SEED + 1)
        n = len(rows)
        names = list(SECTORS)
        self._sector = np.array([names.index(r["sector"]) for r in rows])
        self.n_sectors = len(names)
        ann_vol = np.array([SECTORS[r["sector"]][1] for r in rows]) * rng.lognormal(0, 0.25, n)
        self._beta = rng.uniform(0.6, 1.5, n)
        idio_var = ann_vol**2 - (self._beta * _MARKET_VOL) ** 2 - _SECTOR_VOL**2
        self._idio = np.sqrt(np.maximum(idio_var, (0.3 * ann_vol) ** 2))
        self._price0 = np.exp(rng.uniform(np.log(4.0), np.log(600.0), n))
        activity = rng.lognormal(0.0, 1.2, n)
        silent = rng.permutation(n)[: max(1, n // 20)] if n >= 10 else np.array([], int)
        activity[silent] *= 0.005
        self._weight = activity / activity.sum()
        burst_w = np.sqrt(activity)
        self._burst_weight = burst_w / burst_w.sum()
        self._half_spread = rng.uniform(1e-4, 6e-4, n)
        # Cheap stocks trade in more shares: the log of the typical lot.
        self._log_lot = np.log(np.clip(30_000.0 / self._price0, 100.0, 20_000.0))

    def _state(self) -> None:
        rng, n = self._rng, len(self.tickers)
        self._log_mid = np.log(self._price0)
        self._logvol = rng.normal(0, _LOGVOL_SD, n)
        self._regime = 1
        # Ids start from the tape's start time (about 1.8e12 in 2026): a market restarted later
        # on the same store continues above the ids it used before, so none is a duplicate.
        self._next_id = self.start_ns // NS * 1000 + rng.integers(0, 1000, n).astype(np.int64)
        self._pending_t = np.empty(0, np.int64)
        self._pending_s = np.empty(0, np.int64)
        self._cursor = self.start_ns

    def _intraday(self, t: int) -> float:
        """Return the U-shaped activity factor at event time ``t`` (mean 1 over a session)."""
        u = ((t - self.start_ns) % self._session_ns) / self._session_ns
        return 1.0 + 1.5 * ((2.0 * u - 1.0) ** 2 - 1.0 / 3.0)

    def _block(self, t0: int, t1: int) -> tuple[np.ndarray, ...]:
        """Simulate event time ``[t0, t1)``; return its trades sorted by time, as arrays."""
        rng, n = self._rng, len(self.tickers)
        dt = (t1 - t0) / NS
        f = self._intraday((t0 + t1) // 2)
        if rng.random() < -math.expm1(-dt / _REGIME_DWELL[self._regime]):
            self._regime = int((self._regime + rng.integers(1, 3)) % 3)
        vol_mult, act = _REGIME_VOL[self._regime] * math.sqrt(f), _REGIME_ACT[self._regime] * f

        phi = math.exp(-dt / _LOGVOL_TAU)
        self._logvol = self._logvol * phi + math.sqrt(1 - phi * phi) * _LOGVOL_SD * rng.normal(
            size=n)
        jump = rng.random(n) < _JUMP_RATE * dt
        self._logvol[jump] += _LOGVOL_KICK
        per_s = vol_mult / math.sqrt(_TRADING_SECONDS_PER_YEAR)
        sigma = self._idio * per_s * np.exp(self._logvol - _LOGVOL_SD**2 / 2)
        market = rng.normal() * _MARKET_VOL * per_s * math.sqrt(dt)
        sector = rng.normal(size=self.n_sectors) * _SECTOR_VOL * per_s * math.sqrt(dt)
        self._log_mid += (self._beta * market + sector[self._sector]
                          + jump * rng.normal(0, _JUMP_SD, n))

        # Arrivals: Poisson baseline, bursts (news jumps always start one), spill-over of
        # bursts begun in earlier blocks.
        counts = rng.poisson(self.rate * (1 - _BURST_SHARE) * act * dt * self._weight)
        sym = np.repeat(np.arange(n), counts)
        t = t0 + (rng.random(len(sym)) * (t1 - t0)).astype(np.int64)
        n_bursts = rng.poisson(self.rate * _BURST_SHARE / _BURST_MEAN * act * dt)
        b_sym = np.concatenate([rng.choice(n, n_bursts, p=self._burst_weight),
                                np.flatnonzero(jump)])
        b_len = rng.geometric(1 / _BURST_MEAN, len(b_sym))
        b_len[n_bursts:] *= 3
        b_t0 = t0 + (rng.random(len(b_sym)) * (t1 - t0)).astype(np.int64)
        bt = np.repeat(b_t0, b_len) + (rng.exponential(_BURST_TAU, b_len.sum()) * NS).astype(
            np.int64)
        bs = np.repeat(b_sym, b_len)
        all_t = np.concatenate([t, bt, self._pending_t])
        all_s = np.concatenate([sym, bs, self._pending_s])
        later = all_t >= t1
        self._pending_t, self._pending_s = all_t[later], all_s[later]
        t, sym = all_t[~later], all_s[~later]

        # Sort by (symbol, time) to walk each symbol's mid through its trades.
        order = np.argsort((sym << 43) | (t - t0))
        t, sym = t[order], sym[order]
        m = len(t)
        if m == 0:  # a quiet second: mids still wander, no trades
            self._log_mid += sigma * np.sqrt((t1 - t0) / NS) * rng.normal(size=n)
            empty = np.empty(0, np.int64)
            return (empty, self.codes[:0], np.empty(0), np.empty(0), empty.copy(),
                    np.empty(0, np.int8), empty.copy())
        first = np.ones(m, dtype=bool)
        first[1:] = sym[1:] != sym[:-1]
        starts = np.flatnonzero(first)
        seg = np.cumsum(first) - 1
        prev = np.empty(m, np.int64)
        prev[0:1] = t0
        prev[1:] = t[:-1]
        prev[first] = t0
        step = sigma[sym] * np.sqrt((t - prev) / NS) * rng.normal(size=m)
        walk = np.cumsum(step)
        walk -= (walk[starts] - step[starts])[seg]
        log_mid = self._log_mid[sym] + walk
        usym = sym[starts]
        last = np.append(starts[1:] - 1, m - 1)
        self._log_mid[usym] += walk[last]
        last_t = np.full(n, t0, np.int64)
        last_t[usym] = t[last]
        self._log_mid += sigma * np.sqrt((t1 - last_t) / NS) * rng.normal(size=n)

        # Aggressors lean with the move; buyers lift the ask, sellers hit the bid.
        side = np.where(rng.random(m) < 0.5 + 0.3 * np.sign(step), BUY, SELL).astype(np.int8)
        price = np.exp(log_mid) * (1.0 + side * self._half_spread[sym])
        price = np.maximum(np.rint(price / _TICK) * _TICK, _TICK).round(2)
        odd = rng.random(m) < 0.35
        lots = np.maximum(np.rint(rng.lognormal(self._log_lot[sym] - 5.3, 0.9) * (1 + f / 4)),
                          1.0)
        size = np.where(odd, rng.integers(1, 100, m), 100.0 * lots)
        trade_id = self._next_id[sym] + (np.arange(m) - starts[seg])
        self._next_id[usym] += np.diff(np.append(starts, m))
        recv = t + (200_000 + rng.exponential(300_000.0, m)).astype(np.int64)

        by_time = np.argsort(t, kind="stable")
        return (t[by_time], self.codes[sym[by_time]], price[by_time], size[by_time],
                trade_id[by_time], side[by_time], recv[by_time])

    def _fill(self) -> None:
        """Simulate the next block and queue its batches."""
        t0 = self._cursor
        edges = t0 + self.batch_ns * np.arange(self._per_block + 1, dtype=np.int64)
        cols = self._block(t0, int(edges[-1]))
        cuts = np.searchsorted(cols[0], edges)
        for a, b in zip(cuts[:-1], cuts[1:]):
            self._ready.append(TradeBatch(*(c[a:b] for c in cols)))
        self._cursor = int(edges[-1])
        self._ready_end = int(edges[-1])

    def batches(self, duration_s: float | None = None) -> Iterator[TradeBatch]:
        """Yield the next batches, each covering ``batch_ms`` of event time, sorted by time.

        Parameters
        ----------
        duration_s : float, optional
            Event time to cover, rounded up to whole batches; forever when None. Successive
            calls continue the same tape: ``batches(1)`` twice equals ``batches(2)``.
        """
        if duration_s is not None and not duration_s >= 0:
            raise FeedError(f"simulated market: duration must be >= 0 s, got {duration_s}")
        remaining = None if duration_s is None else math.ceil(duration_s * NS / self.batch_ns)
        while remaining is None or remaining > 0:
            if not self._ready:
                self._fill()
            end = self._ready_end - (len(self._ready) - 1) * self.batch_ns
            batch = self._ready.popleft()
            if self.realtime:
                self._wait_until(end)
            yield batch
            if remaining is not None:
                remaining -= 1

    def _wait_until(self, event_ns: int) -> None:
        if self._wall_offset is None:  # replaying a past start: anchor to the first batch
            self._wall_offset = self._clock() - (event_ns - self.batch_ns)
        delay = (event_ns + self._wall_offset - self._clock()) / NS
        if delay > 0:
            self._sleep(delay)
