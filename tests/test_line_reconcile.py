"""LINE: ``unknown`` rows settled with LINE's own idempotency, and multicast in the dispatch path.

Everything runs on the real ``line-bot-sdk`` adapter against the sandbox's Messaging API, which honours
``X-Line-Retry-Key`` as LINE does (409 + ``X-Line-Accepted-Request-Id`` for a key accepted in the last
24 hours, on its injectable clock). A "crash" is an adapter wrapper that raises a ``BaseException`` in the
worker thread right after (or right before) the real request, which ends the dispatch with the row still
``sending`` and attempted, as a killed process leaves it; ``recover_stale`` then makes it ``unknown``.

* Reconciliation (:class:`RetryKeyRecords`): a request that reached LINE is settled ``sent`` by a 409
  (nothing delivered again); one that never arrived is sent once by the repeat; past the key's 24 hours the
  row is reported for an operator and never resent, transactional included.
* Multicast: identical content to N members goes out as ceil(N/500) multicast requests with one retry key
  each (derived from the rows), each member once, the rate limit counted per request; personalised content
  keeps using push; a member who opts out between claim and send is left out of the request; a crash
  between the request and its outcome is reconciled exactly once, also when reconciliation reads the rows
  in smaller batches than the request had.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from channels.line.adapter import LineChannel, LineConfig, retry_key
from channels.line.sandbox import MULTICAST_PATH, PUSH_PATH
from fakes import seed_members
from membercare.consent import ConsentStatement, record_consents
from membercare.delivery.contract import LineContent
from membercare.delivery.dispatch_batch import BATCH_KEY_PREFIX
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.delivery.reconcile import reconcile_unknown, recover_stale
from membercare.delivery.retry_key_records import RetryKeyRecords
from membercare.models import Channel, Member, Purpose
from sandbox_fixtures import *  # noqa: F403 - the sandbox fixtures

OB, M = OutboxMessage.__table__, Member.__table__
LINE_TOKEN = "line-reconcile-channel-access-token"
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
FAST = DispatchConfig(workers=4, batch_size=50, backoff_base=0.05, backoff_max=0.5, flush_interval=0.05,
                      error_min_samples=10_000)


class Crash(BaseException):
    """The dispatcher process dies here (raised in a worker thread, it ends the dispatch like a kill)."""


class Crashing:
    """The real LINE adapter, except that the process "dies" right after (``after``) or right before its
    request. Without ``batches`` it has no ``send_many``, so every row is pushed alone."""

    channel = Channel.LINE

    def __init__(self, real: LineChannel, *, after: bool):
        self.real, self.after = real, after

    def send(self, message):
        if self.after:
            self.real.send(message)
        raise Crash()

    def close(self) -> None:
        pass


class CrashingBatches(Crashing):
    max_batch = 500

    def send_many(self, messages, batch_key):
        if self.after:
            self.real.send_many(messages, batch_key)
        raise Crash()


def user_id(member_id: int) -> str:
    return "U" + f"{member_id:032x}"


def same_for_all(request):
    return LineContent(text=f"{request.campaign}：週末快閃 全館 8 折")


def personal(request):
    return LineContent(text=f"{request.campaign}：{request.member['name']} 您好")


@pytest.fixture
def line(sandbox):
    sandbox.configure(line_access_tokens=[LINE_TOKEN], capture_requests=50)
    adapter = LineChannel(LineConfig(channel_access_token=LINE_TOKEN, base_url=sandbox.url, timeout_s=5.0))
    yield adapter
    adapter.close()


def seed_line(engine, n: int, now: datetime) -> list[int]:
    with engine.begin() as c:
        ids = seed_members(c, n, preferred="line", push=False, now=now,
                           consent=(("line", "marketing"), ("line", "transactional")))
        c.execute(sa.update(M).where(M.c.id == sa.bindparam("_id")).values(line_user_id=sa.bindparam("uid")),
                  [{"_id": m, "uid": user_id(m)} for m in ids])
    return ids


def plan(engine, ids: list[int], render, *, name: str = "flash", purpose: Purpose = Purpose.MARKETING) -> int:
    as_of = datetime.now(UTC)
    spec = PlanSpec(name, as_of.date().isoformat(), purpose, (Channel.LINE,))
    return plan_run(engine, spec, [ids], as_of, render, policy=NOPOLICY).run_id


def ledger(engine, run_id: int) -> dict[int, dict]:
    with engine.connect() as c:
        return {r["member_id"]: dict(r) for r in c.execute(sa.select(OB).where(OB.c.run_id == run_id)).mappings()}


def delivered(sandbox) -> Counter:
    """LINE messages the sandbox accepted, per full user id (its public list redacts them)."""
    return Counter(r.to for r in sandbox.call(lambda: list(sandbox.app.state.records)) if r.channel == "line")


def requests(sandbox, path: str) -> list[dict]:
    return [r for r in sandbox.captured() if r["path"] == path]


def crash(engine, adapter, run_id: int) -> None:
    with pytest.raises(Crash):
        Dispatcher(engine, {"line": adapter}, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert {r["state"] for r in ledger(engine, run_id).values()} == {"sending"}
    assert recover_stale(engine, lease=timedelta(0), run_id=run_id).unknown == len(ledger(engine, run_id))


def reconcile(engine, line, run_id: int, now: datetime | None = None, batch_size: int = 500,
              policy: PolicySettings = NOPOLICY):
    return reconcile_unknown(engine, run_id=run_id, records=RetryKeyRecords(engine, line, policy=policy),
                             grace=timedelta(0), now=now or datetime.now(UTC), batch_size=batch_size)


def move_sandbox_clock(sandbox, by: timedelta) -> None:
    sandbox.call(lambda: setattr(sandbox.app.line, "clock", lambda: time.time() + by.total_seconds()))


# ---------------------------------------------------------------------------------------------------------------------
# The sandbox honours retry keys as LINE does


def test_sandbox_answers_a_repeated_key_with_409_for_24_hours_then_takes_it_as_new(line, sandbox):
    content = LineContent(text="週末快閃")
    users = ["U" + c * 32 for c in "ab"]
    assert line.multicast(users, content, "k1").status == 200
    again = line.multicast(users[:1], content, "k1")  # another body, same key: still the accepted request
    assert again.status == 409 and sum(delivered(sandbox).values()) == 2
    conflict = requests(sandbox, MULTICAST_PATH)[-1]
    assert conflict["headers"]["X-Line-Retry-Key"] == retry_key("k1")
    move_sandbox_clock(sandbox, timedelta(hours=23, minutes=59))
    assert line.multicast(users, content, "k1").status == 409
    move_sandbox_clock(sandbox, timedelta(hours=24))
    assert line.multicast(users, content, "k1").status == 200  # expired: a new request, delivered again
    assert delivered(sandbox) == Counter({users[0]: 2, users[1]: 2})
    sandbox.configure(line={"error_rate": 1.0})
    assert line.multicast(users, content, "k2").__class__.__name__ == "TransientFailure"
    sandbox.configure(line={"error_rate": 0.0})
    assert line.multicast(users, content, "k2").status == 200  # a refused request does not use up its key


# ---------------------------------------------------------------------------------------------------------------------
# Reconciliation of pushes


def test_a_push_that_reached_line_before_the_crash_is_settled_sent_by_a_409(engine, line, sandbox):
    ids = seed_line(engine, 1, datetime.now(UTC))
    run_id = plan(engine, ids, personal)
    crash(engine, Crashing(line, after=True), run_id)
    assert delivered(sandbox) == Counter({user_id(ids[0]): 1})
    rep = reconcile(engine, line, run_id)
    assert (rep.found_sent, rep.pending, rep.for_operator) == (1, 0, 0)
    row = ledger(engine, run_id)[ids[0]]
    assert row["state"] == "sent" and row["reason_code"] == "reconciled" and "409" in row["reason"]
    assert "crash" in row["reason"]
    assert delivered(sandbox) == Counter({user_id(ids[0]): 1})  # exactly one LINE message
    [probe] = requests(sandbox, PUSH_PATH)[1:]
    assert probe["headers"]["X-Line-Retry-Key"] == retry_key(row["idempotency_key"])
    assert sandbox.stats()["events"]["line.retry_key_conflict"] == 1


def test_a_push_that_never_arrived_is_sent_once_by_reconciliation(engine, line, sandbox):
    ids = seed_line(engine, 1, datetime.now(UTC))
    run_id = plan(engine, ids, personal)
    crash(engine, Crashing(line, after=False), run_id)
    assert not delivered(sandbox)
    rep = reconcile(engine, line, run_id)
    assert rep.found_sent == 1
    row = ledger(engine, run_id)[ids[0]]
    assert row["state"] == "sent" and "had not reached LINE" in row["reason"]
    assert delivered(sandbox) == Counter({user_id(ids[0]): 1})
    assert reconcile(engine, line, run_id).checked == 0  # settled: nothing left to repeat
    assert delivered(sandbox) == Counter({user_id(ids[0]): 1})


@pytest.mark.parametrize("purpose", [Purpose.MARKETING, Purpose.TRANSACTIONAL])
def test_past_the_retry_keys_24_hours_the_row_is_left_for_an_operator_and_never_resent(engine, line, sandbox,
                                                                                       purpose):
    ids = seed_line(engine, 1, datetime.now(UTC))
    run_id = plan(engine, ids, personal, purpose=purpose)
    crash(engine, Crashing(line, after=True), run_id)
    before = len(sandbox.captured())
    later = timedelta(hours=25)
    move_sandbox_clock(sandbox, later)  # LINE has forgotten the key: a repeat would be delivered again
    for _ in range(2):
        rep = reconcile(engine, line, run_id, now=datetime.now(UTC) + later)
        assert (rep.found_sent, rep.requeued, rep.for_operator) == (0, 0, 1)
    row = ledger(engine, run_id)[ids[0]]
    assert row["state"] == "unknown" and row["reason_code"] == "unknown_not_resent"
    assert "retry key has expired" in row["reason"] and "an operator decides" in row["reason"]
    assert len(sandbox.captured()) == before  # no request was made
    assert delivered(sandbox) == Counter({user_id(ids[0]): 1})
    # A dispatcher never picks it up either.
    Dispatcher(engine, {"line": line}, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert delivered(sandbox) == Counter({user_id(ids[0]): 1})


def test_a_repeat_waits_while_sending_is_paused_and_the_member_must_still_allow_line(engine, line, sandbox):
    from membercare.delivery.gate import pause_all, resume_all

    ids = seed_line(engine, 1, datetime.now(UTC))
    run_id = plan(engine, ids, personal)
    crash(engine, Crashing(line, after=False), run_id)
    pause_all(engine, "incident")
    rep = reconcile(engine, line, run_id)
    assert (rep.pending, rep.found_sent, rep.left_unknown) == (1, 0, 0) and not delivered(sandbox)
    resume_all(engine)
    with engine.begin() as c:
        record_consents(c, [ConsentStatement(ids[0], "line", "marketing", False, "line_unfollow", datetime.now(UTC))])
    rep = reconcile(engine, line, run_id)
    assert rep.pending == 1 and not delivered(sandbox)  # a repeat could deliver: not to an opted-out member
    assert ledger(engine, run_id)[ids[0]]["state"] == "unknown"


def test_a_repeat_that_could_deliver_waits_for_the_end_of_the_members_quiet_hours(engine, line, sandbox):
    from zoneinfo import ZoneInfo

    from membercare.delivery.policies import QuietHours

    ids = seed_line(engine, 1, datetime.now(UTC))
    run_id = plan(engine, ids, personal)
    crash(engine, Crashing(line, after=False), run_id)
    now = datetime.now(UTC)
    local = now.astimezone(ZoneInfo("Asia/Taipei"))  # the seeded members' zone
    quiet = PolicySettings(marketing_cap=None, quiet_hours=QuietHours(
        (local - timedelta(hours=1)).time().replace(microsecond=0),
        (local + timedelta(hours=1)).time().replace(microsecond=0), frozenset({"line"})))
    rep = reconcile(engine, line, run_id, now=now, policy=quiet)
    assert rep.pending == 1 and not delivered(sandbox)
    rep = reconcile(engine, line, run_id, now=now + timedelta(hours=2), policy=quiet)
    assert rep.found_sent == 1 and delivered(sandbox) == Counter({user_id(ids[0]): 1})


# ---------------------------------------------------------------------------------------------------------------------
# Multicast in the dispatch path


def test_identical_content_goes_out_as_multicasts_of_500_each_member_once_and_paced_per_request(engine, line,
                                                                                                 sandbox):
    n = 1200
    ids = seed_line(engine, n, datetime.now(UTC))
    run_id = plan(engine, ids, same_for_all)
    waits: list[float] = []
    config = DispatchConfig(workers=4, batch_size=n, flush_interval=0.05, error_min_samples=10_000,
                            rate_limits={"line": 1.0}, bursts={"line": 1.0})
    report = Dispatcher(engine, {"line": line}, config=config, policy=NOPOLICY, sleep=waits.append).dispatch(run_id)
    assert report.outcomes["sent"] == n
    multicasts = requests(sandbox, MULTICAST_PATH)
    assert sorted(len(json.loads(r["body"])["to"]) for r in multicasts) == [200, 500, 500]  # ceil(1200 / 500)
    assert not requests(sandbox, PUSH_PATH)
    assert delivered(sandbox) == Counter({user_id(m): 1 for m in ids})
    rows = ledger(engine, run_id)
    assert {r["state"] for r in rows.values()} == {"sent"}
    # One retry key per request, derived from its rows: the key each row records is its request's.
    keys = Counter(r["provider_message_id"] for r in rows.values())
    assert sorted(keys.values()) == [200, 500, 500]
    assert set(keys) == {r["headers"]["X-Line-Retry-Key"] for r in multicasts}
    # At 1 request/s the limiter and the pacer asked for a few seconds in all, not 1,200.
    assert sum(waits) < 10


def test_personalised_content_keeps_using_push(engine, line, sandbox):
    ids = seed_line(engine, 3, datetime.now(UTC))
    run_id = plan(engine, ids, personal)
    assert Dispatcher(engine, {"line": line}, config=FAST, policy=NOPOLICY).dispatch(run_id).outcomes["sent"] == 3
    assert len(requests(sandbox, PUSH_PATH)) == 3 and not requests(sandbox, MULTICAST_PATH)


class OptOutAtTheGate(Dispatcher):
    """A member opts out of LINE after the claim, just before the batch passes the send gate."""

    def __init__(self, *args, leaving: int, **kw):
        super().__init__(*args, **kw)
        self.leaving, self.done = leaving, False

    def _gate_batch(self, jobs):
        if not self.done:
            self.done = True
            with self.engine.begin() as c:
                record_consents(c, [ConsentStatement(self.leaving, "line", "marketing", False, "line_unfollow",
                                                     datetime.now(UTC))])
        return super()._gate_batch(jobs)


def test_a_member_who_opts_out_between_claim_and_send_is_left_out_of_the_multicast(engine, line, sandbox):
    ids = seed_line(engine, 6, datetime.now(UTC))
    run_id = plan(engine, ids, same_for_all)
    leaving = ids[2]
    OptOutAtTheGate(engine, {"line": line}, config=FAST, policy=NOPOLICY, leaving=leaving).dispatch(run_id)
    [request] = requests(sandbox, MULTICAST_PATH)
    assert sorted(json.loads(request["body"])["to"]) == sorted(user_id(m) for m in ids if m != leaving)
    assert delivered(sandbox) == Counter({user_id(m): 1 for m in ids if m != leaving})
    rows = ledger(engine, run_id)
    assert rows[leaving]["state"] == "skipped" and "right before sending" in rows[leaving]["reason"]
    assert {rows[m]["state"] for m in ids if m != leaving} == {"sent"}


@pytest.mark.parametrize("after", [True, False], ids=["reached-line", "never-arrived"])
def test_a_crash_around_a_multicast_is_reconciled_exactly_once(engine, line, sandbox, after):
    ids = seed_line(engine, 5, datetime.now(UTC))
    run_id = plan(engine, ids, same_for_all)
    crash(engine, CrashingBatches(line, after=after), run_id)
    rows = ledger(engine, run_id)
    [batch] = {r["provider_message_id"] for r in rows.values()}  # written before the request
    assert batch.startswith(BATCH_KEY_PREFIX)
    assert delivered(sandbox) == (Counter({user_id(m): 1 for m in ids}) if after else Counter())
    # Reconciliation reads the unknown rows two at a time: the request is repeated for all five at once.
    rep = reconcile(engine, line, run_id, batch_size=2)
    assert rep.found_sent == 5 and rep.pending == 0
    rows = ledger(engine, run_id)
    assert {r["state"] for r in rows.values()} == {"sent"}
    assert all(("409" in r["reason"]) is after for r in rows.values())
    assert delivered(sandbox) == Counter({user_id(m): 1 for m in ids})
    keys = {r["headers"]["X-Line-Retry-Key"] for r in requests(sandbox, MULTICAST_PATH)}
    assert keys == {retry_key(batch)}  # the dispatcher's request and every repeat: one key


def test_a_member_who_opted_out_after_a_lost_multicast_is_left_out_of_the_repeat_and_skipped(engine, line, sandbox):
    ids = seed_line(engine, 4, datetime.now(UTC))
    run_id = plan(engine, ids, same_for_all)
    crash(engine, CrashingBatches(line, after=False), run_id)
    leaving = ids[0]
    with engine.begin() as c:
        record_consents(c, [ConsentStatement(leaving, "line", "marketing", False, "line_unfollow", datetime.now(UTC))])
    rep = reconcile(engine, line, run_id)
    assert (rep.found_sent, rep.never_received) == (3, 1)
    assert delivered(sandbox) == Counter({user_id(m): 1 for m in ids if m != leaving})
    assert ledger(engine, run_id)[leaving]["state"] == "planned"  # never received: handed back to the dispatcher
    Dispatcher(engine, {"line": line}, config=FAST, policy=NOPOLICY).dispatch(run_id)
    row = ledger(engine, run_id)[leaving]
    assert row["state"] == "skipped" and delivered(sandbox)[user_id(leaving)] == 0


@pytest.mark.parametrize("purpose", [Purpose.MARKETING, Purpose.TRANSACTIONAL])
def test_a_multicast_whose_answer_was_lost_is_unknown_with_its_key_and_reconciled_once(engine, line, sandbox, purpose):
    ids = seed_line(engine, 4, datetime.now(UTC))
    run_id = plan(engine, ids, same_for_all, purpose=purpose)
    sandbox.configure(line={"ghost_rate": 1.0})  # LINE accepts the multicast, then the connection drops
    report = Dispatcher(engine, {"line": line}, config=FAST, policy=NOPOLICY).dispatch(run_id)
    sandbox.configure(line={"ghost_rate": 0.0})
    assert report.outcomes["unknown"] == 4
    rows = ledger(engine, run_id)
    # Transactional too: a resend row by row would carry other retry keys and could deliver twice.
    assert {(r["state"], r["reason_code"]) for r in rows.values()} == {("unknown", "ambiguous_failure")}
    [batch] = {r["provider_message_id"] for r in rows.values()}
    assert batch.startswith(BATCH_KEY_PREFIX)
    rep = reconcile(engine, line, run_id)
    assert rep.found_sent == 4 and rep.requeued == 0
    assert all("409" in r["reason"] and "ambiguous failure" in r["reason"] for r in ledger(engine, run_id).values())
    assert delivered(sandbox) == Counter({user_id(m): 1 for m in ids})


def test_a_multicast_refused_for_one_invalid_user_id_is_sent_one_by_one(engine, line, sandbox):
    ids = seed_line(engine, 4, datetime.now(UTC))
    run_id = plan(engine, ids, same_for_all)
    bad = ids[1]
    sandbox.configure(line_invalid_user_ids=[user_id(bad)])
    Dispatcher(engine, {"line": line}, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert len(requests(sandbox, MULTICAST_PATH)) == 1 and len(requests(sandbox, PUSH_PATH)) == 4
    rows = ledger(engine, run_id)
    assert rows[bad]["state"] == "failed" and "invalid_recipient" in rows[bad]["reason"]
    assert {rows[m]["state"] for m in ids if m != bad} == {"sent"}
    assert all(not (rows[m]["provider_message_id"] or "").startswith(BATCH_KEY_PREFIX) for m in ids)
    assert delivered(sandbox) == Counter({user_id(m): 1 for m in ids if m != bad})


def test_the_sync_flows_records_include_line_and_ask_it_only_about_what_others_did_not_find(engine, line, sandbox):
    from membercare.delivery.provider_records import provider_records_from_env
    from membercare.delivery.reconcile import StaticRecords

    ids = seed_line(engine, 1, datetime.now(UTC))
    run_id = plan(engine, ids, personal)
    crash(engine, Crashing(line, after=True), run_id)
    unknown = list(ledger(engine, run_id).values())
    env = {"MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN": LINE_TOKEN, "MEMBERCARE_LINE_BASE_URL": sandbox.url}
    records = provider_records_from_env(engine, env, also=[StaticRecords({unknown[0]["message_id"]: "export"})])
    assert records is not None and [type(s).__name__ for s in records.sources] == ["StaticRecords", "RetryKeyRecords"]
    try:
        before = len(sandbox.captured())
        verdict = records.settle([unknown[0]["message_id"]], now=datetime.now(UTC))
        assert verdict.found == {unknown[0]["message_id"]: "export"}
        assert len(sandbox.captured()) == before  # found already: LINE was not asked (no repeat sent)
    finally:
        records.close()
