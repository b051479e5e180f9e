"""Error bars for the lessons' comparisons: is a difference between two measured numbers more than luck?

Every difference is reported as "a − b = d ± e (95%, n paired scenes)": d the difference of the means, e the
half-width of its 95% interval. Two designs occur in the lessons:
- paired: both models measured on the same items (the same held-out scenes, or runs with the same seeds).
  The interval comes from the item-by-item differences, so what the items share (an easy scene is easy for
  both models) cancels out. Also as a seeded bootstrap over the items, which assumes no distribution;
- independent: two groups with nothing matched item by item; the standard error of a difference of means.
The multiplier is Student's t at 97.5%: 1.96 for hundreds of scenes, 4.30 for three seeds, where 1.96 would
give an interval half as wide as it should be.
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    difference: float  # mean of a minus mean of b
    error: float  # half-width of the 95% interval
    n: int  # paired items, or the items of both groups

    @property
    def low(self) -> float:
        return self.difference - self.error

    @property
    def high(self) -> float:
        return self.difference + self.error

    @property
    def survives(self) -> bool:
        """The interval leaves out zero: the sign of the difference is more than the luck of the sample."""
        return self.low > 0 or self.high < 0


def t95(df: float) -> float:
    """Student's t at 97.5% for `df` degrees of freedom (df may be fractional, as Welch's is)."""
    if df <= 0:
        raise ValueError(f"an interval needs at least one degree of freedom, got {df}")
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def central(x):  # P(0 < T < x), Simpson's rule over the density (smooth, so 2000 panels are plenty)
        t = np.linspace(0.0, x, 2001)
        f = np.exp(log_scale - (df + 1) / 2 * np.log1p(t * t / df))
        return x / 6000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    low, high = 0.0, 1.0
    while central(high) < 0.475:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if central(mid) < 0.475 else (low, mid)
    return (low + high) / 2


def paired(a, b) -> Interval:
    """mean(a − b) ± t95(n − 1) standard errors of the n item-by-item differences a_i − b_i."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"a paired interval needs two equally long lists of at least 2 items, got shape {d.shape}")
    return Interval(float(d.mean()), t95(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d)), len(d))


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0) -> tuple:
    """(low, high): the 2.5% and 97.5% points of mean(a − b) over `resamples` draws of the items with
    replacement, each draw keeping a_i with its b_i. Seeded, so a lesson prints the same interval every run."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def independent(a, b) -> Interval:
    """mean(a) − mean(b) ± t95(Welch's df) · sqrt(var(a)/n_a + var(b)/n_b): the groups may differ in spread."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        raise ValueError("each group needs at least 2 values for its spread")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return Interval(float(a.mean() - b.mean()), 0.0, len(a) + len(b))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Interval(float(a.mean() - b.mean()), t95(df) * math.sqrt(va + vb), len(a) + len(b))


def describe(interval: Interval, a: str = "a", b: str = "b", items: str = "paired scenes", digits: int = 4) -> str:
    """'a − b = +0.0285 ± 0.0118 (95%, 500 paired scenes)'."""
    return (f"{a} − {b} = {interval.difference:+.{digits}f} ± {interval.error:.{digits}f} "
            f"(95%, {interval.n} {items})")
