"""Uplift (membercare.optimise.uplift): logistic fits, Qini curves by hand, planted heterogeneity recovered, and
the Hillstrom women's e-mail by past women's-merchandise buyers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from membercare.optimise.lift import binary_lift, load_hillstrom
from membercare.optimise.uplift import (
    TwoModelUplift,
    auuc,
    fit_logistic,
    hillstrom_features,
    qini_coefficient,
    qini_curve,
    subgroup_uplift,
    uplift_at,
)

FILE = Path(__file__).resolve().parent / "fixtures" / "hillstrom" / "hillstrom.csv.zip"


def test_logistic_fit_is_the_maximum_likelihood_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3)) * [1.0, 5.0, 0.2] + [0.0, 10.0, 1.0]
    true = np.array([0.8, -0.3, 2.0])
    y = rng.random(3000) < 1 / (1 + np.exp(-(-0.5 + (x - [0.0, 10.0, 1.0]) @ true)))
    model = fit_logistic(x, y, l2=0.0)

    def nll(b):
        z = b[0] + x @ b[1:]
        return float(np.sum(np.logaddexp(0, z)) - np.sum(y * z))

    ref = optimize.minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-9}).x
    p = 1 / (1 + np.exp(-(ref[0] + x @ ref[1:])))
    assert model.predict(x) == pytest.approx(p, abs=1e-6)
    assert model.coef / model.scale == pytest.approx(ref[1:], rel=1e-4)
    # A ridge penalty shrinks the standardised coefficients.
    assert np.all(np.abs(fit_logistic(x, y, l2=500.0).coef) < np.abs(model.coef))


def test_qini_curve_by_hand():
    # Scores: 0.9 (t, y=1), 0.8 (c, y=0), 0.5 tie of (t, y=0) and (c, y=1), 0.1 (t, y=1).
    y = [1, 0, 0, 1, 1]
    t = [1, 0, 1, 0, 1]
    s = [0.9, 0.8, 0.5, 0.5, 0.1]
    c = qini_curve(y, t, s)
    assert c.targeted.tolist() == [0, 1, 2, 4, 5]
    # k=1: 1 - 0; k=2: 1 - 0*1/1; k=4: 1 - 1*2/2 = 0; k=5: 2 - 1*3/2 = 0.5.
    assert c.qini.tolist() == pytest.approx([0, 1, 1, 0, 0.5])
    # Uplift curve: (Y_t/N_t - Y_c/N_c) * k; k=1 has no held-out member (rate 0).
    assert c.uplift.tolist() == pytest.approx([0, 1, 2 * (1 - 0), 4 * (1 / 2 - 1 / 2), 5 * (2 / 3 - 1 / 2)])


def test_qini_coefficient_is_one_for_the_perfect_ranking_and_zero_on_average_for_random_ones():
    rng = np.random.default_rng(1)
    t = rng.random(4000) < 0.5
    y = rng.random(4000) < np.where(t, 0.15, 0.10)
    perfect = (y & t).astype(float) - (y & ~t)
    assert qini_coefficient(y, t, perfect) == pytest.approx(1.0)
    assert qini_coefficient(y, t, -perfect) < -0.5
    random = [qini_coefficient(y, t, rng.random(4000)) for _ in range(200)]
    assert abs(np.mean(random)) < 3 * np.std(random) / np.sqrt(200)
    assert np.isfinite(auuc(y, t, rng.random(4000)))


def test_two_model_uplift_recovers_a_planted_responsive_group():
    """Only members with feature 0 above 0 respond to the message (+10 points); feature 1 drives the base rate for
    everyone. Trained on one half, judged on the other: the ranking puts the responsive members first."""
    rng = np.random.default_rng(7)
    n = 20_000
    x = rng.normal(size=(n, 3))
    t = rng.random(n) < 0.5
    base = 1 / (1 + np.exp(-(-2.0 + 0.8 * x[:, 1])))
    y = rng.random(n) < base + np.where(t & (x[:, 0] > 0), 0.10, 0.0)
    train = rng.random(n) < 0.5
    model = TwoModelUplift.fit(x[train], t[train], y[train])
    score = model.predict(x[~train])
    responsive = x[~train, 0] > 0
    assert score[responsive].mean() > score[~responsive].mean() + 0.05
    q = qini_coefficient(y[~train], t[~train], score)
    chance = [qini_coefficient(y[~train], t[~train], rng.random(int((~train).sum()))) for _ in range(50)]
    assert q > 2 * max(chance)
    assert uplift_at(y[~train], t[~train], score, 0.3) > uplift_at(y[~train], t[~train], score, 1.0) + 0.03
    with pytest.raises(ValueError):
        TwoModelUplift.fit(x, np.ones(n, dtype=bool), y)


def test_hillstrom_womens_email_works_for_past_womens_buyers():
    d = load_hillstrom(FILE)
    keep = (d.segment == "Womens E-Mail") | (d.segment == "No E-Mail")
    t, women, visit = (d.segment == "Womens E-Mail")[keep], d.womens[keep], d.visit[keep]
    sg = subgroup_uplift(visit, t, women)
    ref = binary_lift(int(visit[t & women].sum()), int((t & women).sum()), int(visit[~t & women].sum()),
                      int((~t & women).sum()))
    assert sg.inside == ref
    # +7.31 visit points among past women's-merchandise buyers, +1.11 among the rest.
    assert sg.inside.absolute_lift == pytest.approx(0.0731, abs=5e-5)
    assert sg.outside.absolute_lift == pytest.approx(0.0111, abs=5e-5)
    assert sg.interval[0] > 0.04 and sg.p_value < 1e-15
    # The two-model ranking, judged on the half it was not trained on, beats random targeting.
    x = hillstrom_features(d)[keep]
    rng = np.random.default_rng(2026)
    train = rng.random(len(t)) < 0.5
    score = TwoModelUplift.fit(x[train], t[train], visit[train]).predict(x[~train])
    assert qini_coefficient(visit[~train], t[~train], score) > 0.03


def test_training_set_from_a_past_holdout(engine):
    """Features at the run's as_of, arms by intent to treat, outcome in the window after the planned send."""
    from datetime import timedelta

    from membercare.optimise.uplift import HOLDOUT_FEATURES, holdout_training_set
    from test_attribution import T0, Shop

    s = Shop(engine)
    a, b, c = s.member(), s.member(), s.member()
    run = s.run("winback", as_of=T0)
    s.message(run, a, at=T0 + timedelta(hours=1))
    s.message(run, b, channel=None, state="skipped", at=T0 + timedelta(hours=1))  # treated, never sent
    s.message(run, c, channel=None, variant="holdout", state="skipped", at=T0 + timedelta(hours=1))
    s.order(a, T0 - timedelta(days=10), total=20_000)
    s.order(a, T0 - timedelta(days=100), total=10_000)
    s.order(a, T0 - timedelta(days=400), total=99_900)  # older than a year: not in the 365-day figures
    s.order(c, T0 - timedelta(days=30), total=5_000)
    s.order(a, T0 + timedelta(days=2), total=1_000)  # outcome within the 7-day window
    s.order(c, T0 + timedelta(days=9), total=1_000)  # after the window
    with engine.connect() as conn:
        ts = holdout_training_set(conn, "winback", T0 - timedelta(days=1), T0 + timedelta(days=1))
    assert ts.member_id.tolist() == [a, b, c]
    assert ts.treatment.tolist() == [True, True, False] and ts.outcome.tolist() == [True, False, False]
    f = dict(zip(HOLDOUT_FEATURES, ts.features.T, strict=True))
    assert f["days_since_purchase"].tolist() == pytest.approx([10, 730, 30])
    assert f["never_bought"].tolist() == [0, 1, 0]
    assert f["orders_365"].tolist() == [2, 0, 1]
    assert f["log_spend_365"].tolist() == pytest.approx([np.log1p(300), 0, np.log1p(50)])
    assert f["tenure_days"].tolist() == pytest.approx([99, 99, 99])
