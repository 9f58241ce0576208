"""Sources of trades: each module turns one kind of wire payload or file into TradeBatch objects.

- :mod:`flows.feeds.simulated` -- the embedded default, a seeded synthetic market.
- :mod:`flows.feeds.replay` -- recorded files (CSV, Parquet, Binance JSONL captures).

Every mistake a user can make with a feed (a file that is not there, a format we do not know, a
missing column, a bad time unit) raises :class:`FeedError`, whose message is one line that the
CLI prints before exiting non-zero.
"""
from __future__ import annotations

__all__ = ["FeedError"]


class FeedError(Exception):
    """A user-facing feed problem; ``str()`` is one line naming the source and what is wrong.

    Examples
    --------
    >>> err = FeedError("trades.csv: missing column 'price' (have: time, symbol, size)")
    >>> print(err)
    trades.csv: missing column 'price' (have: time, symbol, size)
    """

    def __init__(self, message: str):
        # One line, whatever the cause's message looked like (the CLI prints exactly this).
        super().__init__(" ".join(str(message).split()))
