"""The decision log of a routed outbox row: which policy chose its channel and local send hour, and with which
probability (the propensity), so that other policies can be evaluated from the logs
(:mod:`membercare.optimise.offpolicy`) and learners can weight by inverse propensity
(:mod:`membercare.optimise.causal`).

A planner hook that randomises (``prefer``, ``deliver_at``) says how likely its choice was through
:class:`LogsPropensity`; without a hook the choice is deterministic (the member's own channel order, as soon as
quiet hours allow) and its propensity is 1. A hook that does not say gets no propensity (NULL): such rows
cannot be used for off-policy evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from zoneinfo import ZoneInfo

from membercare.timeutil import ensure_utc

NO_DECISION: Mapping[str, Any] = {"policy": None, "chosen_channel": None, "channel_propensity": None,
                                  "send_hour": None, "hour_propensity": None}


@runtime_checkable
class LogsPropensity(Protocol):
    """A hook that knows the probability of what it chose for the member it was last asked about."""

    policy_label: str

    def propensity(self, member_id: int, option: Any) -> float | None: ...


def _part(hook: object, default: str) -> tuple[str, LogsPropensity | None]:
    if hook is None:
        return default, None
    if isinstance(hook, LogsPropensity):
        return hook.policy_label, hook
    return type(hook).__name__, None


def decision_columns(prefer: object, deliver_at: object, member_id: int, channel: str, send_at: datetime,
                     zone: ZoneInfo, *, routed_channel: str | None = None) -> dict[str, Any]:
    """The outbox decision columns of a routed row whose first channel is ``channel``, due at ``send_at``.

    ``routed_channel`` is the first channel routing chose before the frequency cap; when the cap changed it, the
    policy did not choose ``channel`` and its probability is unknown (NULL)."""
    c_label, c_hook = _part(prefer, "preference")
    h_label, h_hook = _part(deliver_at, "now")
    hour = ensure_utc(send_at).astimezone(zone).hour
    pc = c_hook.propensity(member_id, channel) if c_hook is not None else (1.0 if prefer is None else None)
    ph = h_hook.propensity(member_id, hour) if h_hook is not None else (1.0 if deliver_at is None else None)
    if routed_channel is not None and routed_channel != channel:
        pc = None
    return {"policy": f"{c_label}+{h_label}"[:64], "chosen_channel": channel, "channel_propensity": pc,
            "send_hour": hour, "hour_propensity": ph}


def after_cap(row: dict[str, Any], channel: str, send_at: datetime, zone: ZoneInfo) -> None:
    """Correct a row's decision after the frequency cap moved its first channel (and so perhaps its send hour):
    what the cap chose has no known probability."""
    if row.get("policy") is None:
        return
    hour = ensure_utc(send_at).astimezone(zone).hour
    if channel != row["chosen_channel"]:
        row.update(chosen_channel=channel, channel_propensity=None)
    if hour != row["send_hour"]:
        # Without a send-time hook the hour follows the channel's quiet hours deterministically.
        row.update(send_hour=hour, hour_propensity=1.0 if row["policy"].endswith("+now") else None)
