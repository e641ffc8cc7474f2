"""`campaign estimate`: the funnel of a dry run without rendering or writing, and the minimum detectable lift
whose error rates are checked by simulation."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from clirun import run_cli
from membercare.campaigns.audience import resolve_audience
from membercare.campaigns.dry_run import dry_run
from membercare.campaigns.estimate import estimate, minimum_detectable_difference
from membercare.campaigns.occurrence import RunOptions, prepare
from membercare.config import Settings
from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.models import Coupon

AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 Asia/Taipei


def _rejections(p_control: float, diff: float, nt: int, nc: int, sims: int, rng) -> float:
    """Share of simulated experiments a two-sided pooled two-proportion z-test at 5 % rejects."""
    xt = rng.binomial(nt, p_control + diff, sims)
    xc = rng.binomial(nc, p_control, sims)
    pooled = (xt + xc) / (nt + nc)
    se = np.sqrt(pooled * (1 - pooled) * (1 / nt + 1 / nc))
    z = np.divide(xt / nt - xc / nc, se, out=np.zeros(sims), where=se > 0)
    return float(np.mean(np.abs(z) > 1.959964))


@pytest.mark.parametrize("p, nt, nc", [(0.05, 9000, 1000), (0.2, 1800, 200), (0.1, 5000, 5000)])
def test_the_minimum_detectable_difference_has_its_stated_power_and_size(p, nt, nc):
    rng = np.random.default_rng(19)
    mde = minimum_detectable_difference(p, nt, nc)
    assert mde is not None and mde > 0
    power = _rejections(p, mde, nt, nc, 20_000, rng)
    size = _rejections(p, 0.0, nt, nc, 20_000, rng)
    # Stated: power 80 %, false positives 5 % (normal approximation; 20,000 draws: +-0.6 points at 2 sigma).
    assert 0.76 <= power <= 0.84, power
    assert 0.035 <= size <= 0.065, size


def test_no_control_no_detectable_lift():
    assert minimum_detectable_difference(0.1, 100, 0) is None


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=400, seed=11, as_of=AS_OF - timedelta(hours=10))
    return engine


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def _rows(engine):
    with engine.connect() as conn:
        return [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (OutboxMessage.__table__, CampaignRun.__table__, Coupon.__table__)]


@pytest.mark.slow  # a generated shop and two dry runs
def test_estimate_matches_the_dry_run_and_writes_nothing(shop, settings):
    before = _rows(shop)
    prepared = prepare(settings, "churn_winback", RunOptions(as_of=AS_OF, dry_run=True, samples=0))
    audience = resolve_audience(shop, prepared)
    est = estimate(shop, prepared, audience)
    assert _rows(shop) == before
    rep = dry_run(shop, prepared, audience)
    assert est.segment_size == audience.size > 0
    assert est.now == rep.would_send and est.later == rep.deferred
    assert est.holdout == rep.by_reason.get("holdout", 0) > 0
    # Every member of the audience is accounted for: messaged or excluded with a reason.
    assert est.messaged + sum(est.excluded.values()) == rep.considered
    assert est.mde is not None and 0 < est.baseline_rate < 1


@pytest.mark.slow  # a generated shop and a CLI process
def test_estimate_command_prints_the_funnel_without_prefect(shop, db_url, tmp_path):
    r = run_cli("campaign", "estimate", "churn_winback", "--as-of", "2026-11-23", home=tmp_path,
                env={"MEMBERCARE_DATABASE_URL": db_url})
    assert r.returncode == 0, r.stderr
    assert "segment size" in r.stdout and "no message: holdout" in r.stdout
    assert "minimum detectable lift" in r.stdout and "nothing was written or sent" in r.stdout
    assert "prefect" not in (r.stdout + r.stderr).lower()
