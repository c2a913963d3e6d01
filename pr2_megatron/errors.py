"""The library's exception types: bad routes and bad settings.

One ``except RouteError`` catches every bad route.
"""

from __future__ import annotations


class RouteError(ValueError):
    """A route that cannot be replayed exactly: malformed, missing, unconsumed or mismatched.

    Raised for a route table that fails validation (shape, dtype, expert ids, duplicate ids,
    layers, token counts), a route file that is corrupt or unchecked, a replay target of the
    wrong shape, a replay forward without a target, a target never consumed, and a recompute
    whose route cannot be paired with its forward. A ``ValueError``, since a bad route is bad
    input.
    """


class ConfigError(ValueError):
    """A config file, override or setting that cannot be used (names the file, key and value)."""
