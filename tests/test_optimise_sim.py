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
    assert res["config"]["arms"][-3:] == ["best_fixed_rule", "causal_time", "causal"]
    assert "optimised vs best_fixed_rule" in res["lift_over_static"]
    assert res["curves"]["best_fixed_rule"][0]["variant_shares"] == {"A": 0.0, "B": 1.0, "C": 0.0}
    assert res["curves"]["best_fixed_rule"][0]["mean_hour_distance"] < res["curves"]["static"][0]["mean_hour_distance"]
    assert sim.to_markdown(res).count("best_fixed_rule") >= 2


def test_causal_arms_log_propensities_and_learn_the_hour_from_send_times():
    """The exploring arms randomise about 10 % of channel and hour decisions, log their probabilities, and learn
    hours that are closer to the members' hidden best hours than the shop's single hour, from send hours and
    outcomes only; the off-policy check covers every arm."""
    res = sim.simulate(3000, 8, seed=5, final_rounds=2, honest=True)
    last = {a: res["curves"][a][-1] for a in ("static", "causal_time", "causal", "best_time")}
    assert last["causal_time"]["mean_hour_distance"] < last["static"]["mean_hour_distance"] - 0.5
    assert last["causal_time"]["mean_hour_distance"] < last["best_time"]["mean_hour_distance"]
    ope = res["offpolicy"]
    assert set(ope) == set(res["config"]["arms"])
    for o in ope.values():
        for k in ("ips", "snips", "dr"):
            assert o[k]["n"] == 3000 * 8
    # The exploring arm's own greedy policy matches most logged rows (exploration is 10 %).
    assert ope["causal"]["ips"]["matched"] > 0.75 * 3000 * 8


def test_exploring_logs_have_valid_propensities():
    pop = sim.make_population(2000, np.random.default_rng(2), honest=True)
    arm = sim.ArmState("causal", True, True, True, np.random.default_rng(3), np.zeros((2000, 3), np.int64),
                       np.zeros((2000, 3), np.int64), honest=True, explore=0.1)
    for rnd in (1, 2):
        sim.run_round(arm, pop, rnd, final=False)
    lg = arm.logs[-1]
    assert np.all((lg["p_channel"] > 0) & (lg["p_channel"] <= 1))
    assert np.all(np.isclose(lg["p_hour"], 0.1 / 12) | np.isclose(lg["p_hour"], 0.9 + 0.1 / 12))
    assert pop.eligible[np.arange(2000), lg["channel"]].all()
    assert set(np.unique(lg["hour"])) <= set(range(9, 21))
    assert 0.05 < np.mean(lg["hour"] != lg["greedy_hour"]) < 0.12
