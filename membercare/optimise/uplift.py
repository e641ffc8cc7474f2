"""Uplift: whom does a message change? A two-model uplift estimator trained on a past randomised holdout, judged
by its Qini curve; and the plain stratified uplift of a pre-declared subgroup.

numpy only (no scikit-learn here):

* **Two-model uplift** (:class:`TwoModelUplift`): one L2-regularised logistic regression of the outcome on the
  features among the treated members, one among the held-out members (IRLS, features standardised on the
  training data, intercept not penalised); the predicted uplift is the difference of the two predicted
  probabilities. Trained on a past campaign's treated and holdout rows (the holdout makes the difference causal).
* **Qini curve** (:func:`qini_curve`): members sorted by predicted uplift, best first; at each cut the
  incremental outcomes ``Y_t(k) - Y_c(k) * N_t(k) / N_c(k)`` (Radcliffe 2007). The **Qini coefficient**
  (:func:`qini_coefficient`) is the area between that curve and the straight line of random targeting, over the
  same area for the perfect ranking (0: no better than random, 1: perfect); **AUUC** (:func:`auuc`) the same
  for the uplift curve ``(Y_t(k)/N_t(k) - Y_c(k)/N_c(k)) * k``. Both follow scikit-uplift's ``qini_auc_score``
  and ``uplift_auc_score``. Judge a model on members it was not trained on.
* **Stratified uplift** (:func:`subgroup_uplift`): the treated-minus-holdout rate inside a subgroup and outside
  it (Newcombe intervals, :func:`membercare.optimise.lift.binary_lift`) and the difference of the two (Wald): the
  honest answer to "does the e-mail work better for past buyers of women's merchandise?" needs no model.

The Hillstrom figures (women's e-mail; ``bench/uplift_hillstrom.py``) are in docs/optimisation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from numpy.typing import ArrayLike
from scipy import stats as sps
from sqlalchemy.engine import Connection

from membercare.optimise.lift import BinaryLift, HillstromData, binary_lift
from membercare.timeutil import ensure_utc


@dataclass(frozen=True)
class LogisticModel:
    """``P(y = 1 | x) = sigmoid(b0 + ((x - mean) / scale) . b)``."""

    intercept: float
    coef: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    iterations: int

    def predict(self, x: ArrayLike) -> np.ndarray:
        z = (np.asarray(x, dtype=float) - self.mean) / self.scale
        return _sigmoid(self.intercept + z @ self.coef)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # overflow-free logistic


def fit_logistic(x: ArrayLike, y: ArrayLike, *, l2: float = 1.0, max_iter: int = 50,
                 tol: float = 1e-8) -> LogisticModel:
    """L2-regularised logistic regression by iteratively reweighted least squares (Newton). ``l2`` is the ridge
    penalty on the standardised coefficients (the intercept is not penalised)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError("x needs shape (n, p) and y shape (n,), n > 0")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("y must be 0/1")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    design = np.column_stack([np.ones(len(y)), (x - mean) / scale])
    beta = np.zeros(design.shape[1])
    rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    beta[0] = math.log(rate / (1 - rate))
    penalty = np.full(design.shape[1], float(l2))
    penalty[0] = 0.0
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        p = _sigmoid(design @ beta)
        w = np.maximum(p * (1 - p), 1e-12)
        grad = design.T @ (y - p) - penalty * beta
        hess = (design * w[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        beta += step
        if float(np.max(np.abs(step))) < tol:
            break
    return LogisticModel(float(beta[0]), beta[1:].copy(), mean, scale, iterations)


@dataclass(frozen=True)
class TwoModelUplift:
    treated: LogisticModel
    control: LogisticModel

    @classmethod
    def fit(cls, x: ArrayLike, treatment: ArrayLike, y: ArrayLike, *, l2: float = 1.0) -> TwoModelUplift:
        x, t, y = np.asarray(x, dtype=float), np.asarray(treatment, dtype=bool), np.asarray(y, dtype=float)
        if t.all() or not t.any():
            raise ValueError("uplift needs treated and held-out members")
        return cls(fit_logistic(x[t], y[t], l2=l2), fit_logistic(x[~t], y[~t], l2=l2))

    def predict(self, x: ArrayLike) -> np.ndarray:
        """Predicted uplift ``P(y | treated, x) - P(y | held out, x)`` per member."""
        return self.treated.predict(x) - self.control.predict(x)


@dataclass(frozen=True)
class QiniCurve:
    targeted: np.ndarray  # members targeted at each cut (0 .. n)
    qini: np.ndarray  # incremental outcomes Y_t(k) - Y_c(k) N_t(k) / N_c(k)
    uplift: np.ndarray  # (Y_t(k)/N_t(k) - Y_c(k)/N_c(k)) * k


def qini_curve(y: ArrayLike, treatment: ArrayLike, score: ArrayLike) -> QiniCurve:
    """The Qini and uplift curves of a ranking by ``score`` (higher: target first), at every distinct score
    (ties are cut together)."""
    y, t, s = np.asarray(y, dtype=float), np.asarray(treatment, dtype=bool), np.asarray(score, dtype=float)
    if not (y.shape == t.shape == s.shape) or y.ndim != 1:
        raise ValueError("y, treatment and score need the same 1-d shape")
    order = np.argsort(-s, kind="stable")
    y, t, s = y[order], t[order], s[order]
    nt, nc = np.cumsum(t), np.cumsum(~t)
    yt, yc = np.cumsum(y * t), np.cumsum(y * ~t)
    cut = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    nt, nc, yt, yc = nt[cut], nc[cut], yt[cut], yc[cut]
    k = cut + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        qini = yt - np.where(nc > 0, yc * nt / nc, 0.0)
        upl = (np.where(nt > 0, yt / nt, 0.0) - np.where(nc > 0, yc / nc, 0.0)) * k
    return QiniCurve(np.r_[0.0, k], np.r_[0.0, qini], np.r_[0.0, upl])


def _auc(x: np.ndarray, curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, x))


def _normalised(x: np.ndarray, curve: np.ndarray, px: np.ndarray, perfect: np.ndarray) -> float:
    """(area of the curve - area of random targeting) / (area of the perfect ranking - area of random)."""
    random = _auc(np.array([0.0, x[-1]]), np.array([0.0, curve[-1]]))
    best = _auc(px, perfect) - random
    return (_auc(x, curve) - random) / best if best != 0 else math.nan


def _perfect_qini_score(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    return y * t - y * (1 - t)  # treated responders first, held-out responders last


def _perfect_uplift_score(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    control_responders, treated_silent = np.sum((y == 1) & (t == 0)), np.sum((y == 0) & (t == 1))
    return 2.0 * (y == t) + (y if control_responders > treated_silent else t)


def qini_coefficient(y: ArrayLike, treatment: ArrayLike, score: ArrayLike) -> float:
    """Normalised area between the Qini curve and random targeting: 0 for a random ranking, 1 for the perfect one
    (treated responders first, held-out responders last). The definition of scikit-uplift's ``qini_auc_score``
    (with ``negative_effect=True``)."""
    y, t = np.asarray(y, dtype=float), np.asarray(treatment, dtype=float)
    c, p = qini_curve(y, t, score), qini_curve(y, t, _perfect_qini_score(y, t))
    return _normalised(c.targeted, c.qini, p.targeted, p.qini)


def auuc(y: ArrayLike, treatment: ArrayLike, score: ArrayLike) -> float:
    """Normalised area under the uplift curve above random targeting (scikit-uplift's ``uplift_auc_score``)."""
    y, t = np.asarray(y, dtype=float), np.asarray(treatment, dtype=float)
    c, p = qini_curve(y, t, score), qini_curve(y, t, _perfect_uplift_score(y, t))
    return _normalised(c.targeted, c.uplift, p.targeted, p.uplift)


def uplift_at(y: ArrayLike, treatment: ArrayLike, score: ArrayLike, share: float) -> float:
    """Treated minus held-out rate among the ``share`` of members with the highest score."""
    y, t, s = np.asarray(y, dtype=float), np.asarray(treatment, dtype=bool), np.asarray(score, dtype=float)
    top = np.argsort(-s, kind="stable")[: max(1, int(round(share * len(s))))]
    yt, tt = y[top], t[top]
    if not tt.any() or tt.all():
        return math.nan
    return float(yt[tt].mean() - yt[~tt].mean())


@dataclass(frozen=True)
class SubgroupUplift:
    inside: BinaryLift
    outside: BinaryLift
    difference: float  # inside uplift minus outside uplift
    interval: tuple[float, float]  # Wald, the two subgroups independent
    p_value: float


def subgroup_uplift(y: ArrayLike, treatment: ArrayLike, subgroup: ArrayLike, *,
                    confidence: float = 0.95) -> SubgroupUplift:
    """Treated-vs-holdout lift of a binary outcome inside and outside a subgroup, and their difference."""
    y, t, g = np.asarray(y, dtype=bool), np.asarray(treatment, dtype=bool), np.asarray(subgroup, dtype=bool)

    def lift(mask: np.ndarray) -> BinaryLift:
        return binary_lift(int(y[mask & t].sum()), int((mask & t).sum()), int(y[mask & ~t].sum()),
                           int((mask & ~t).sum()), confidence=confidence)

    inside, outside = lift(g), lift(~g)

    def var(b: BinaryLift) -> float:
        return (b.treated_rate * (1 - b.treated_rate) / b.treated_n
                + b.control_rate * (1 - b.control_rate) / b.control_n)

    d = inside.absolute_lift - outside.absolute_lift
    se = math.sqrt(var(inside) + var(outside))
    z = float(sps.norm.ppf(0.5 + confidence / 2.0))
    p = 2.0 * float(sps.norm.sf(abs(d) / se)) if se > 0 else math.nan
    return SubgroupUplift(inside, outside, d, (d - z * se, d + z * se), p)


HILLSTROM_FEATURES = ("recency", "log_history", "mens", "womens", "newbie", "urban", "suburban", "web", "phone")


def hillstrom_features(data: HillstromData) -> np.ndarray:
    """The pre-campaign features of the Hillstrom customers (:data:`HILLSTROM_FEATURES`): months since the last
    purchase, log(1 + past-year spend in dollars), merchandise kinds bought, new customer, area and channel."""
    zip_code, channel = data.zip_code.astype(str), data.channel.astype(str)
    return np.column_stack([
        data.recency.astype(float), np.log1p(data.history_minor / 100.0), data.mens, data.womens, data.newbie,
        zip_code == "Urban", np.char.startswith(zip_code, "Su"), channel == "Web", channel == "Phone",
    ]).astype(float)


HOLDOUT_FEATURES = ("days_since_purchase", "never_bought", "orders_365", "log_spend_365", "tenure_days")


@dataclass(frozen=True)
class TrainingSet:
    """One row per outbox row of a past campaign with a holdout: features before the run, arm and outcome."""

    member_id: np.ndarray
    features: np.ndarray  # columns: HOLDOUT_FEATURES
    treatment: np.ndarray  # True: in the treated arm (sent or not: intent to treat)
    outcome: np.ndarray  # True: a purchase within the window after the planned send


def _ms(col: Any) -> sa.ColumnElement[int]:
    return sa.cast(sa.func.round((sa.func.julianday(col) - 2440587.5) * 86400000.0), sa.BigInteger)


def _before(conn: Connection, placed_at: Any, as_of: Any, days: int | None = None) -> sa.ColumnElement[bool]:
    """``placed_at < as_of`` (and ``>= as_of - days``); SQLite compares integer milliseconds (its stored text mixes
    formats)."""
    if conn.dialect.name == "sqlite":
        cond = [_ms(placed_at) < _ms(as_of)]
        if days is not None:
            cond.append(_ms(placed_at) >= _ms(as_of) - days * 86_400_000)
        return sa.and_(*cond)
    cond = [placed_at < as_of]
    if days is not None:
        cond.append(placed_at >= as_of - sa.literal_column(f"interval '{int(days)} days'"))
    return sa.and_(*cond)


def holdout_training_set(conn: Connection, campaign: str, since: datetime, until: datetime, *,
                         window_days: float = 7.0) -> TrainingSet:
    """The treated and held-out rows of ``campaign`` scheduled in ``[since, until)`` (global-control rows left
    out), each with the member's features at the run's ``as_of`` (:data:`HOLDOUT_FEATURES`: days since the last
    purchase, capped at 730, and whether there was none; purchases and log(1 + spend in major units) in the 365
    days before; days since joining) and whether they bought within ``window_days`` after the planned send."""
    from membercare.delivery.models import CampaignRun, OutboxMessage
    from membercare.delivery.planner import GLOBAL_CONTROL, HOLDOUT
    from membercare.engagement.attribution import within_window
    from membercare.models import PURCHASE_STATUSES, Member, Order

    ob, r, o, m = OutboxMessage.__table__, CampaignRun.__table__, Order.__table__, Member.__table__
    bought = [o.c.member_id == ob.c.member_id, o.c.status.in_(PURCHASE_STATUSES)]
    year = sa.and_(*bought, _before(conn, o.c.placed_at, r.c.as_of, 365))
    last = sa.select(sa.func.max(o.c.placed_at)).where(*bought, _before(conn, o.c.placed_at, r.c.as_of)
                                                     ).scalar_subquery()
    outcome = sa.exists().where(*bought, within_window(conn, o.c.placed_at, ob.c.scheduled_at,
                                                       int(window_days * 86400)))
    q = (sa.select(ob.c.member_id, sa.case((ob.c.variant == HOLDOUT, 0), else_=1).label("treated"),
                   r.c.as_of, m.c.joined_at, last.label("last"),
                   sa.select(sa.func.count(o.c.id)).where(year).scalar_subquery().label("orders"),
                   sa.select(sa.func.coalesce(sa.func.sum(o.c.total_minor), 0)).where(year).scalar_subquery()
                   .label("spend"), sa.case((outcome, 1), else_=0).label("y"))
         .select_from(ob.join(r, r.c.id == ob.c.run_id).join(m, m.c.id == ob.c.member_id))
         .where(ob.c.campaign == campaign, ob.c.scheduled_at >= since, ob.c.scheduled_at < until,
                sa.or_(ob.c.variant.is_(None), ob.c.variant != GLOBAL_CONTROL)).order_by(ob.c.id))
    rows = conn.execute(q).all()
    feats = []
    for row in rows:
        as_of = ensure_utc(row.as_of)
        last_at = ensure_utc(row.last) if row.last is not None else None
        days = min((as_of - last_at).total_seconds() / 86400, 730.0) if last_at is not None else 730.0
        tenure = max((as_of - ensure_utc(row.joined_at)).total_seconds() / 86400, 0.0)
        feats.append((days, float(last_at is None), float(row.orders), math.log1p(float(row.spend) / 100.0), tenure))
    return TrainingSet(np.array([row.member_id for row in rows], dtype=np.int64),
                       np.array(feats, dtype=float).reshape(-1, len(HOLDOUT_FEATURES)),
                       np.array([bool(row.treated) for row in rows]), np.array([bool(row.y) for row in rows]))


__all__ = ["HILLSTROM_FEATURES", "HOLDOUT_FEATURES", "LogisticModel", "QiniCurve", "SubgroupUplift", "TrainingSet",
           "TwoModelUplift", "auuc", "fit_logistic", "hillstrom_features", "holdout_training_set", "qini_coefficient",
           "qini_curve", "subgroup_uplift", "uplift_at"]
