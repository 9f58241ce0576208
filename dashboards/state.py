"""Application state shared by the dashboard pages of one session."""
from __future__ import annotations

import param

from flows.schema import TIMEFRAMES

#: The app's pages, in navigation order: URL key -> label.
PAGES: dict[str, str] = {"candles": "Candles", "market": "Market", "quality": "Quality",
                         "monitor": "Monitor", "alerts": "Alerts"}


class AppState(param.Parameterized):
    """What the user is looking at: a page, one symbol, one timeframe, a number of bars.

    Pages read and set these parameters; widgets are created from them by the pages, never
    stored here.

    Examples
    --------
    >>> state = AppState(symbol="AAPL", timeframe="5m")
    >>> state.symbol, state.timeframe, state.lookback, state.page
    ('AAPL', '5m', 200, 'candles')
    """

    page = param.Selector(default="candles", objects=list(PAGES), doc="""
        Page shown by the app (the ``page`` URL query parameter).""")

    symbol = param.Selector(default=None, objects=[], check_on_set=False, allow_None=True, doc="""
        Symbol shown. Its objects are the symbols known to the source; a symbol the flow has
        not seen yet is allowed (pages show it as empty).""")

    timeframe = param.Selector(default="1m", objects=list(TIMEFRAMES), doc="""
        Bar timeframe shown, one of the source's timeframes.""")

    lookback = param.Integer(default=200, bounds=(10, 10_000), doc="""
        Number of most recent bars loaded and kept by the live chart.""")

    @classmethod
    def from_source(cls, source, **params) -> AppState:
        """Return a state whose choices are the ``source``'s symbols and timeframes.

        The first symbol and the first timeframe are selected unless given in ``params``.
        """
        symbols = list(source.symbols())
        timeframes = list(source.timeframes()) or ["1m"]
        state = cls(**{k: v for k, v in params.items() if k not in ("symbol", "timeframe")})
        state.param.symbol.objects = symbols
        state.param.timeframe.objects = timeframes
        state.param.update(
            symbol=params.get("symbol", symbols[0] if symbols else None),
            timeframe=params.get("timeframe", timeframes[0]),
        )
        return state
