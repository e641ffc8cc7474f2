"""A/A calibration of variant promotion (issue 17), small: the full table is ``bench/aa_calibration.py``.

Bound: with ``SIMS`` simulated A/A tests, the number of false winners of a rule whose true false-winner rate is
the 5 % target is Binomial(SIMS, 0.05); the test fails when the observed rate exceeds 0.05 + 3 binomial standard
errors, which a rule meeting the target does with probability below 0.2 % (the measured rate is below 1 %).
"""

import math

from bench.aa_calibration import drift, simulate

SIMS = 400
TARGET = 0.05
BOUND = TARGET + 3 * math.sqrt(TARGET * (1 - TARGET) / SIMS)  # 0.0827


def test_false_winner_rate_of_identical_variants_is_within_the_target():
    for k in (2, 3):
        aa = simulate(k, 20, 1000, sims=SIMS, seed=100 + k)
        assert aa.promoted <= BOUND, (k, aa)


def test_a_planted_winner_is_found_and_the_base_rate_drifts():
    # +50 % relative at 3 %: the sequential test finds it in most tests within 20 runs of 5,000 sends.
    got = simulate(2, 20, 5000, sims=100, planted_lift=0.5, seed=9)
    assert got.right >= 0.8 and got.promoted == got.right
    base = drift(52, 0.03)
    assert base.max() / base.min() > 2  # the simulated base rate swings, so pooling would be biased
