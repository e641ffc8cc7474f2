"""Uplift on the Hillstrom e-mail test: the women's e-mail among past women's-merchandise buyers against the rest,
and a two-model uplift ranking judged by its Qini coefficient on customers it was not trained on.

    .venv/bin/python bench/uplift_hillstrom.py [--file tests/fixtures/hillstrom/hillstrom.csv.zip] [--splits 5]

Women's e-mail customers against the No E-Mail customers (42,693 of the 64,000). For visit and conversion:

* the stratified uplift (treated minus held-out rate) among customers who bought women's merchandise in the past
  year and among the rest, and the difference (no model: membercare.optimise.uplift.subgroup_uplift);
* a two-model uplift (two logistic regressions on the nine pre-campaign features) trained on a random half and
  judged on the other half, over ``--splits`` random splits: normalised Qini coefficient and AUUC, the uplift in
  the top 30 % by predicted uplift against everyone, and the Qini of 200 random rankings of the same test halves
  (what chance gives) and of the one-feature rule "women's buyers first".

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from membercare.optimise.lift import load_hillstrom
from membercare.optimise.uplift import (
    TwoModelUplift,
    auuc,
    hillstrom_features,
    qini_coefficient,
    subgroup_uplift,
    uplift_at,
)

ROOT = Path(__file__).resolve().parent.parent


def _r(x: float, d: int = 4) -> float:
    return round(float(x), d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=ROOT / "tests" / "fixtures" / "hillstrom" / "hillstrom.csv.zip")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    started = time.perf_counter()
    d = load_hillstrom(args.file)
    keep = (d.segment == "Womens E-Mail") | (d.segment == "No E-Mail")
    x, t, women = hillstrom_features(d)[keep], (d.segment == "Womens E-Mail")[keep], d.womens[keep]
    out: dict = {"customers": int(keep.sum()), "treated": int(t.sum()), "held_out": int((~t).sum()),
                 "womens_buyers": int(women.sum()), "outcomes": {}}
    rng = np.random.default_rng(args.seed)
    splits = [rng.random(len(t)) < 0.5 for _ in range(args.splits)]
    for outcome in ("visit", "conversion"):
        y = getattr(d, outcome)[keep]
        sg = subgroup_uplift(y, t, women)
        res: dict = {"womens_buyers": {"uplift": _r(sg.inside.absolute_lift, 5),
                                       "ci": [_r(v, 5) for v in sg.inside.absolute_lift_ci],
                                       "treated_rate": _r(sg.inside.treated_rate), "held_out_rate":
                                       _r(sg.inside.control_rate)},
                     "the_rest": {"uplift": _r(sg.outside.absolute_lift, 5),
                                  "ci": [_r(v, 5) for v in sg.outside.absolute_lift_ci],
                                  "treated_rate": _r(sg.outside.treated_rate),
                                  "held_out_rate": _r(sg.outside.control_rate)},
                     "difference": _r(sg.difference, 5), "difference_ci": [_r(v, 5) for v in sg.interval],
                     "difference_p": float(f"{sg.p_value:.3g}")}
        qini, auc_, top, everyone, rule, chance = [], [], [], [], [], []
        for train in splits:
            test = ~train
            model = TwoModelUplift.fit(x[train], t[train], y[train])
            score = model.predict(x[test])
            qini.append(qini_coefficient(y[test], t[test], score))
            auc_.append(auuc(y[test], t[test], score))
            top.append(uplift_at(y[test], t[test], score, 0.3))
            everyone.append(uplift_at(y[test], t[test], score, 1.0))
            rule.append(qini_coefficient(y[test], t[test], women[test].astype(float)))
            chance += [qini_coefficient(y[test], t[test], rng.random(int(test.sum()))) for _ in range(40)]
        res["two_model"] = {
            "qini": _r(np.mean(qini)), "qini_per_split": [_r(q) for q in qini], "auuc": _r(np.mean(auc_)),
            "uplift_top_30pct": _r(np.mean(top), 5), "uplift_everyone": _r(np.mean(everyone), 5),
            "womens_first_rule_qini": _r(np.mean(rule)),
            "random_ranking_qini": {"mean": _r(np.mean(chance)), "p2.5": _r(np.quantile(chance, 0.025)),
                                    "p97.5": _r(np.quantile(chance, 0.975)), "rankings": len(chance)}}
        out["outcomes"][outcome] = res
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
