"""The one bisection every search here uses: thresholds, budgets and image counts."""

from __future__ import annotations

from collections.abc import Callable


def last_passing(lo: int, hi: int, passes: Callable[[int], bool]) -> int:
    """The last integer in [lo, hi) that ``passes``, by bisection, for a test that holds up to
    some point and fails after it: ``lo`` passes (or is known too small), ``hi`` fails."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


def first_fitting(n: int, fits: Callable[[int], bool]) -> int | None:
    """The first index in [0, n] that ``fits``, for a test that fails up to some point and holds
    after it (a budget met by ever stronger pruning); None when even ``n`` does not fit."""
    if not fits(n):
        return None
    return last_passing(-1, n, lambda i: not fits(i)) + 1
