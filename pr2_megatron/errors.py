"""The one exception type of bad routes, so that one ``except RouteError`` catches them all."""

from __future__ import annotations


class RouteError(ValueError):
    """A route that cannot be replayed exactly: malformed, missing, unconsumed or mismatched.

    Raised for a route table that fails validation (shape, dtype, expert ids, duplicate ids,
    layers, token counts), a route file that is corrupt or unchecked, a replay target of the
    wrong shape, a replay forward without a target, a target never consumed, and a recompute
    whose route cannot be paired with its forward. A ``ValueError``, since a bad route is bad
    input.
    """
