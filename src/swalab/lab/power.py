"""Power of the paired t-test over seeds, without NaN: seeds to decide and the minimum detectable effect.

The power of a two-sided one-sample t-test at level ``alpha`` with ``n`` observations whose mean
is ``effect`` standard deviations from 0 is ``P(|T| > c)``, ``T = (Z + delta) / S``,
``delta = effect * sqrt(n)``, ``Z ~ N(0, 1)``, ``S = sqrt(V / df)``, ``V ~ chi^2_df``,
``c = t_{1 - alpha/2, df}``. Conditioning on ``S`` gives a one-dimensional integral,

    power = E_S[ Phi(delta - c S) + Phi(-delta - c S) ],

computed here by quadrature over the quantiles of ``S``. It equals the noncentral t
distribution's tail (``scipy.stats.nct``) where that is finite; ``nct`` returns NaN at large
noncentralities (``df = 1``, ``delta`` around 11 and beyond), which the integral never does.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, special
from scipy import stats as scipy_stats

__all__ = ["MAX_SEEDS", "minimum_detectable_effect", "seeds_to_decide", "t_test_power"]

MAX_SEEDS = 10_000  # beyond this a claim counts as undecidable at the observed variance
_NODES = 256  # Gauss-Legendre nodes over the quantiles of S


@functools.lru_cache(maxsize=512)
def _s_quantiles(df: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``S(u_i) = sqrt(chi2_df^{-1}(u_i) / df)`` and weights of Gauss-Legendre on ``u in (0, 1)``."""
    x, w = np.polynomial.legendre.leggauss(_NODES)
    u = (x + 1) / 2
    return np.sqrt(scipy_stats.chi2.ppf(u, df) / df), w / 2


def t_test_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test at ``alpha`` with ``n >= 2`` observations whose
    true mean is ``effect`` standard deviations away from 0 (never NaN; in ``[alpha, 1]``)."""
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not math.isfinite(effect):
        raise ValueError(f"effect must be a finite number of standard deviations, got {effect!r}")
    df = n - 1
    crit = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    delta = abs(effect) * math.sqrt(n)
    s, w = _s_quantiles(df)
    upper = special.ndtr(delta - crit * s)
    lower = special.ndtr(-delta - crit * s)
    return float(min(1.0, max(alpha, float(np.dot(w, upper + lower)))))


def seeds_to_decide(
    mean: float,
    sd: float,
    margin: float | None = None,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> int | None:
    """Seeds for a paired t-test (two-sided, ``alpha``) to reach ``power`` at this mean and sd.

    Without ``margin``: the smallest ``n >= 2`` with :func:`t_test_power` ``>= power`` (power
    grows with ``n``: a bisection). With ``margin`` (equivalence, two one-sided tests at
    ``alpha / 2``): the smallest ``n`` with ``(margin - |mean|) sqrt(n) / sd >= t_{1 - alpha/2,
    n-1} + t_{power, n-1}``. ``None`` when no number of seeds decides it (no observed
    difference, a mean beyond the margin, or more than ``MAX_SEEDS``).
    """
    if not (math.isfinite(mean) and math.isfinite(sd)):
        return None
    effect = (margin - abs(mean)) if margin is not None else abs(mean)
    if effect <= 0:
        return None
    if sd == 0:
        return 2

    def reached(n: int) -> bool:
        if margin is not None:
            df = n - 1
            need = scipy_stats.t.ppf(1 - alpha / 2, df) + scipy_stats.t.ppf(power, df)
            return effect * math.sqrt(n) / sd >= need
        return t_test_power(effect / sd, n, alpha) >= power

    if not reached(MAX_SEEDS):
        return None
    low, high = 2, MAX_SEEDS  # reached(high); find the smallest
    if reached(low):
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reached(mid) else (mid, high)
    return high


def minimum_detectable_effect(
    sd: float,
    n: int,
    margin: float | None = None,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """The smallest true mean (in the unit of the data) that ``n`` seeds at standard deviation
    ``sd`` detect with probability ``power`` (two-sided paired t-test at ``alpha``).

    With ``margin`` (equivalence): the distance from the margin at which the two one-sided tests
    reach ``power``, ``(t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)``: a mean closer to 0
    than ``margin`` minus this is shown equivalent with probability ``power``. NaN when ``n < 2``
    or ``sd`` is not finite.
    """
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    if margin is not None:
        df = n - 1
        need = scipy_stats.t.ppf(1 - alpha / 2, df) + scipy_stats.t.ppf(power, df)
        return float(need * sd / math.sqrt(n))
    high = 1.0
    while t_test_power(high, n, alpha) < power:
        high *= 2
    effect = optimize.brentq(lambda e: t_test_power(e, n, alpha) - power, 0.0, high, xtol=1e-10)
    return float(effect * sd)
