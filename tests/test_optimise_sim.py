"""bench/optimise_sim.py's honest scenario (issue 17): no hidden signal in event hours, a best-fixed-rule arm."""

import numpy as np

from bench import optimise_sim as sim


def test_honest_population_plants_no_best_hour_signal_in_the_history():
    pop = sim.make_population(5000, np.random.default_rng(1), honest=True)
    hist_best = pop.best_hour[pop.history_member]
    assert abs(np.corrcoef(pop.history_hour, hist_best)[0, 1]) < 0.05
    leaky = sim.make_population(5000, np.random.default_rng(1))
    assert np.corrcoef(leaky.history_hour, leaky.best_hour[leaky.history_member])[0, 1] > 0.5
    # The stated preference names the truly best channel more often than in the leaky scenario.
    best = np.argsort(-pop.theta, axis=1)[:, 0]
    assert (pop.preference[:, 0] == best).mean() > (leaky.preference[:, 0] == best).mean() + 0.2
    assert sim.ALLOWED.start <= pop.shop_hour <= sim.ALLOWED.end


def test_honest_run_has_the_best_fixed_rule_arm():
    res = sim.simulate(2000, 3, seed=3, final_rounds=1, honest=True)
    assert res["config"]["arms"][-1] == "best_fixed_rule"
    assert "optimised vs best_fixed_rule" in res["lift_over_static"]
    assert res["curves"]["best_fixed_rule"][0]["variant_shares"] == {"A": 0.0, "B": 1.0, "C": 0.0}
    assert res["curves"]["best_fixed_rule"][0]["mean_hour_distance"] < res["curves"]["static"][0]["mean_hour_distance"]
    assert sim.to_markdown(res).count("best_fixed_rule") >= 2
