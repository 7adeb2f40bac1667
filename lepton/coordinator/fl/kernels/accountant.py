"""Privacy accounting for the sampled Gaussian mechanism with Rényi DP (RDP).

Each round of central DP releases ``sum of clipped updates + N(0, (z C)^2)``, with each
client taking part with probability ``q`` (the sampling rate). That is the sampled Gaussian
mechanism with noise multiplier ``z``; its RDP at order ``alpha`` is computed exactly as in
Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
(2019): a finite sum for integer orders and a convergent two-sided series for fractional
ones. RDP composes by addition over rounds, and :func:`eps_from_rdp` converts it to
``(epsilon, delta)``-DP with the tighter conversion of Balle et al. (2020, Prop. 12), the
one TensorFlow Privacy, Opacus and Google's ``dp-accounting`` use.

The bound assumes Poisson sampling (each client independently with probability ``q``);
selecting exactly ``k`` of ``N`` clients is commonly accounted with ``q = k / N``, which is
an approximation. Pure math (numpy, scipy), no state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import special

#: Orders of the RDP curve searched for the best epsilon (those Opacus uses by default).
DEFAULT_ORDERS: Final[tuple[float, ...]] = (
    *(1.0 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    128.0,
    256.0,
    512.0,
)


_MAX_TERMS: Final = 10_000


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """``log(exp(a) - exp(b))`` for ``a >= b``."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    if a < b:
        raise ValueError("log of a negative number")
    return a + math.log(-math.expm1(b - a))


def _log_erfc(x: float) -> float:
    return float(math.log(2.0) + special.log_ndtr(-x * math.sqrt(2.0)))


def _log_binom(n: float, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        term = (
            _log_binom(alpha, i)
            + i * math.log(q)
            + (alpha - i) * math.log1p(-q)
            + (i * i - i) / (2.0 * sigma**2)
        )
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """``log A_alpha`` for fractional ``alpha`` (Mironov et al. 2019, Sec. 3.3).

    Two generalised binomial series, for the integral below and above ``z0``. Their
    coefficients change sign past ``alpha``; the signs are kept, which makes the sum exact
    (dp-accounting 0.6 adds magnitudes instead, an upper bound). Returns inf, so that the
    order is skipped, if the series has not converged after ``_MAX_TERMS`` terms.
    """
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    last_s0 = last_s1 = -math.inf
    for i in range(_MAX_TERMS):
        coef = float(special.binom(alpha, i))
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2.0) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2.0) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2.0 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2.0 * sigma**2) + log_e1
        if coef > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        # Done once both terms shrink and no longer matter next to the sum.
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    return math.inf


@functools.lru_cache(maxsize=4096)  # per-step RDP is reused every round of a job
def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * sigma**2)
    if math.isinf(alpha):
        return math.inf
    if float(alpha).is_integer():
        log_a = _log_a_int(q, sigma, int(alpha))
    else:
        log_a = _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1.0)


def rdp_sampled_gaussian(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> npt.NDArray[np.float64]:
    """RDP of ``steps`` compositions of the sampled Gaussian mechanism, per order (> 1)."""
    if not 0.0 <= sampling_rate <= 1.0:
        raise ValueError("sampling_rate must be in [0, 1]")
    if not noise_multiplier >= 0:
        raise ValueError("noise_multiplier must be >= 0")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if any(a <= 1 for a in orders):
        raise ValueError("RDP orders must be > 1")
    per_step = [_rdp_one(sampling_rate, noise_multiplier, float(a)) for a in orders]
    return np.asarray(per_step, dtype=np.float64) * steps


def eps_from_rdp(
    orders: Sequence[float], rdp: Sequence[float] | npt.NDArray[np.float64], delta: float
) -> tuple[float, float]:
    """The smallest ``epsilon`` over ``orders`` for this ``delta``, and the order giving it."""
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must be in (0, 1)")
    best, best_order = math.inf, math.nan
    for alpha, r in zip(orders, rdp, strict=True):
        if r < 0:
            raise ValueError("RDP values must be >= 0")
        if math.isinf(r):
            continue
        if delta**2 + math.expm1(-r) >= 0:
            eps = 0.0  # delta >= sqrt(1 - exp(-KL)) already: no epsilon is needed
        else:
            eps = r + math.log1p(-1.0 / alpha) - math.log(delta * alpha) / (alpha - 1.0)
        if eps < best:
            best, best_order = eps, float(alpha)
    return max(0.0, float(best)), best_order


def epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """``epsilon`` spent after ``steps`` rounds at this noise and sampling rate (inf if z=0)."""
    if steps == 0 or sampling_rate == 0:
        return 0.0
    rdp = rdp_sampled_gaussian(sampling_rate, noise_multiplier, steps, orders)
    return eps_from_rdp(orders, rdp, delta)[0]


def noise_multiplier_for(
    *,
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (within ``tolerance``) keeping ``epsilon`` at most
    ``target_epsilon`` after ``steps`` rounds."""
    if not target_epsilon > 0:
        raise ValueError("target_epsilon must be > 0")

    def eps_at(z: float) -> float:
        return epsilon(noise_multiplier=z, sampling_rate=sampling_rate, steps=steps, delta=delta)

    low, high = 0.0, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e6:
            raise ValueError("no noise multiplier up to 1e6 reaches the target epsilon")
    while high - low > tolerance:
        mid = (low + high) / 2.0
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
