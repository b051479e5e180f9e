"""The lessons' error bars against independent computations: scipy's t-tests and bootstrap where scipy is
installed, and the textbook formulas written out with the statistics module."""

import math
import random
import statistics

import pytest

from nxtp_minimal.training import stats

# Student's t at 97.5% from printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 30: 2.042, 100: 1.984}


def samples(n, seed=0):
    """Two per-scene measurements that share most of their variation, like two models on the same scenes."""
    rng = random.Random(seed)
    scene = [rng.random() for _ in range(n)]
    return [s + rng.gauss(0.03, 0.1) for s in scene], [s + rng.gauss(0.0, 0.1) for s in scene]


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t95_matches_the_printed_table(df):
    assert stats.t95(df) == pytest.approx(T_TABLE[df], abs=6e-4)


def test_t95_matches_scipy_also_for_fractional_degrees_of_freedom():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 2.7, 4.5, 499, 10_000):
        assert stats.t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-6)


def test_paired_is_the_textbook_interval():
    a, b = samples(500)
    d = [x - y for x, y in zip(a, b)]
    interval = stats.paired(a, b)
    assert interval.n == 500
    assert interval.difference == pytest.approx(statistics.fmean(d), rel=1e-12)
    assert interval.error == pytest.approx(stats.t95(499) * statistics.stdev(d) / math.sqrt(500), rel=1e-12)
    # the shared scene effect cancels: far narrower than treating the two lists as unrelated
    assert interval.error < stats.independent(a, b).error / 3


def test_paired_and_independent_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = samples(40, seed=1)
    low, high = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (stats.paired(a, b).low, stats.paired(a, b).high) == pytest.approx((low, high), rel=1e-6)
    a3, b3 = [0.61, 0.58, 0.64], [0.52, 0.57, 0.49, 0.55]  # three seeds against four, different spreads
    low, high = scipy_stats.ttest_ind(a3, b3, equal_var=False).confidence_interval(0.95)
    interval = stats.independent(a3, b3)
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-6)
    assert interval.n == 7


def test_independent_by_hand_with_welchs_degrees_of_freedom():
    a, b = [0.61, 0.58, 0.64], [0.52, 0.57, 0.49]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    interval = stats.independent(a, b)
    assert interval.difference == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert interval.error == pytest.approx(stats.t95(df) * math.sqrt(va + vb))
    assert 4 > df > 3.5 and interval.error > 1.96 * math.sqrt(va + vb) * 1.3  # few values: wider than 1.96


def test_bootstrap_agrees_with_scipy_and_with_the_t_interval():
    a, b = samples(500, seed=2)
    low, high = stats.paired_bootstrap(a, b)
    assert (low, high) == stats.paired_bootstrap(a, b)  # seeded
    interval = stats.paired(a, b)
    # for a mean of 500 items the bootstrap and the t interval describe the same spread
    assert low == pytest.approx(interval.low, abs=interval.error * 0.1)
    assert high == pytest.approx(interval.high, abs=interval.error * 0.1)
    scipy_stats = pytest.importorskip("scipy.stats")
    d = [x - y for x, y in zip(a, b)]
    ci = scipy_stats.bootstrap((d,), statistics.fmean, n_resamples=10_000, method="percentile", random_state=5,
                               vectorized=False).confidence_interval
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=interval.error * 0.05)  # Monte Carlo error only


def test_survives_and_describe():
    a, b = samples(500)
    interval = stats.paired(a, b)
    assert interval.survives and not stats.paired(b, b).survives
    assert not stats.Interval(0.01, 0.02, 3).survives and stats.Interval(-0.03, 0.02, 3).survives
    text = stats.describe(stats.Interval(0.0285, 0.01183, 500), "label mask", "causal mask")
    assert text == "label mask − causal mask = +0.0285 ± 0.0118 (95%, 500 paired scenes)"
    assert stats.describe(stats.Interval(-0.1, 0.25, 3), items="seeds", digits=2) == "a − b = -0.10 ± 0.25 (95%, 3 seeds)"


def test_too_few_items_are_refused():
    with pytest.raises(ValueError):
        stats.paired([1.0], [0.0])
    with pytest.raises(ValueError):
        stats.independent([1.0], [0.0, 1.0])
