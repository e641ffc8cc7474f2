"""``membercare churn validate``: FHL 2005's calibration/holdout figures on the CDNOW sample, and the CLI."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from clirun import run_cli
from membercare.errors import InputError
from segments.churn_validate import validate_file

CDNOW = Path(__file__).parent / "fixtures" / "cdnow" / "CDNOW_sample.txt"
CAL_END, HOLDOUT_END = date(1997, 9, 30), date(1998, 6, 30)


@pytest.fixture(scope="module")
def validation():
    return validate_file(CDNOW, "cdnow", CAL_END, HOLDOUT_END)


def test_tracks_cumulative_repeat_transactions_as_published(validation):
    v = validation
    assert v.customers == 2357 and v.weeks[-1] == 78
    # FHL 2005: 4,339 actual cumulative repeat transactions at week 78, BG/NBD predicts about 4,160.
    assert v.actual_cumulative[-1] == 4339
    assert v.predicted_cumulative[-1] == pytest.approx(4160, rel=0.01)
    assert v.final_error == pytest.approx(-0.04, abs=0.005)
    # The calibration period's 2,457 repeat transactions, the holdout's 1,882.
    assert v.actual_cumulative[38] == 2457 and v.holdout_actual == 1882
    assert all(b >= a for a, b in zip(v.predicted_cumulative, v.predicted_cumulative[1:], strict=False))


def test_conditional_expectations_by_purchase_count(validation):
    rows = {r["x"]: r for r in validation.conditional}
    assert list(rows) == ["0", "1", "2", "3", "4", "5", "6", "7+"]
    assert sum(r["customers"] for r in rows.values()) == 2357 and rows["0"]["customers"] == 1411
    # FHL figure 4: predictions follow the actual means, rising with x (0.24 actual vs 0.23 predicted at x = 0).
    assert rows["0"]["actual"] == pytest.approx(0.237, abs=0.001)
    assert rows["0"]["predicted"] == pytest.approx(0.225, abs=0.001)
    assert rows["7+"]["predicted"] > rows["3"]["predicted"] > rows["0"]["predicted"]


def test_the_old_churn_flag_over_flags_and_the_value_rule_is_calibrated(validation):
    old, new = validation.flags
    # P(alive) < 0.5 among repeat buyers: 35 % of the flagged bought in the holdout, the model implies 20 %.
    assert old.flagged == 393 and old.bought_in_holdout == pytest.approx(0.354, abs=0.001)
    assert old.implied == pytest.approx(0.198, abs=0.001)
    # P(no purchase in the holdout) >= 0.5 with single buyers: 21.9 % bought against 19.7 % implied.
    assert new.flagged > 5 * old.flagged
    assert abs(new.bought_in_holdout - new.implied) < 0.03 < abs(old.bought_in_holdout - old.implied)


def test_invalid_periods():
    with pytest.raises(InputError, match="holdout must end after"):
        validate_file(CDNOW, "cdnow", CAL_END, CAL_END)
    with pytest.raises(InputError, match="no customer"):
        validate_file(CDNOW, "cdnow", date(1990, 1, 1), HOLDOUT_END)


@pytest.mark.slow  # a CLI process importing the application
def test_cli_validate(tmp_path):
    args = ["churn", "validate", "--transactions", str(CDNOW), "--format", "cdnow", "--calibration-end", "1997-09-30",
            "--holdout-end", "1998-06-30"]
    out = run_cli(*args, "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["actual_cumulative"][-1] == 4339 and abs(data["final_error"] + 0.04) < 0.005
    text = run_cli(*args, home=tmp_path)
    assert text.returncode == 0 and "4,339" in text.stdout and "Cumulative repeat transactions" in text.stdout
