"""``membercare campaign run NAME``: one campaign occurrence through the ``run-campaign`` Prefect flow.

Prefect is imported inside the command only (``import membercare`` stays Prefect-free). Without a
configured Prefect API (``PREFECT_API_URL``) the flow runs in Prefect's local ephemeral mode.
"""

from __future__ import annotations

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, migrated_engine, state
from membercare.errors import InputError

campaign_app = typer.Typer(help="Run lifecycle campaigns (through the Prefect flows).", no_args_is_help=True)
app.add_typer(campaign_app, name="campaign")


def parse_params(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--param must look like NAME=VALUE (a segment parameter), got {v!r}")
        out[key.strip()] = value.strip()
    return out


def summary_table(result: dict, title: str) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows = [("segment size", result["segment_size"]),
            ("planned" if not result.get("dry_run") else "considered", result["planned"])]
    if not result.get("dry_run"):
        rows.append(("newly planned", result["newly_planned"]))
    verb = "would send" if result.get("dry_run") else "sent"
    for ch in ("email", "sms", "push", "line"):
        if ch != "line" or result["sent"].get(ch):
            rows.append((f"{verb} via {ch}", result["sent"].get(ch, 0)))
    if not result.get("dry_run"):
        rows.append(("sent in this run", result.get("sent_now", 0)))
    rows.append(("deferred (quiet hours, retries)", result["deferred"]))
    for group in ("suppressed", "skipped", "failed"):
        for reason, n in sorted(result[group].items()):
            rows.append((f"{group}: {reason}", n))
    if result.get("unknown"):
        rows.append(("unknown", result["unknown"]))
    for label, value in rows:
        t.add_row(label, f"{value:,}")
    return t


def _refuse_future(as_of: str | None, dry_run: bool) -> None:
    """A real send at a future ``--as-of`` is a usage error, caught before Prefect starts."""
    from membercare.campaigns.occurrence import RunOptions, refuse_future_as_of
    from membercare.timeutil import parse_as_of

    if as_of is None:
        return
    try:
        refuse_future_as_of(RunOptions(as_of=parse_as_of(as_of, state.settings.shop_timezone), dry_run=dry_run))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--as-of'") from None
    except InputError as exc:
        raise typer.BadParameter(f"{exc} (or add --schedule: a Prefect flow run of the campaign's deployment "
                                 "then sends it at that moment)", param_hint="'--as-of'") from None


def _schedule_checks(as_of: str | None, dry_run: bool) -> None:
    from membercare.timeutil import parse_as_of, utcnow

    if dry_run:
        raise typer.BadParameter("a dry run sends nothing: there is nothing to schedule", param_hint="'--schedule'")
    if as_of is None:
        raise typer.BadParameter("--schedule needs the moment to send at: --as-of DATETIME", param_hint="'--schedule'")
    try:
        at = parse_as_of(as_of, state.settings.shop_timezone)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--as-of'") from None
    if at <= utcnow():
        raise typer.BadParameter(f"{as_of} is not in the future: run it now, without --schedule",
                                 param_hint="'--as-of'")


@campaign_app.command("run")
def run_cmd(
    name: str = typer.Argument(..., help="Campaign name (a folder of templates/)."),
    as_of: str = typer.Option(None, "--as-of",
                              help="Date (start of that day, shop time) or ISO datetime; default now."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and render in memory; send and write nothing."),
    limit: int = typer.Option(None, "--limit", min=0, help="At most this many members."),
    channel: list[str] = typer.Option(None, "--channel", help="Only this channel of the campaign's (repeatable)."),
    tag: str = typer.Option(None, "--tag", help="Occurrence tag (separates several schedules of one campaign)."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Segment parameter NAME=VALUE (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Resume a run paused by its error budget or an operator."),
    samples: bool = typer.Option(True, "--samples/--no-samples", help="Dry run: show rendered samples."),
    schedule: bool = typer.Option(False, "--schedule",
                                  help="With a future --as-of: send nothing now; create a scheduled flow run of "
                                       "the campaign's deployment at that moment (needs a Prefect server)."),
) -> None:
    """Run one occurrence of a campaign: resolve the segment, plan, dispatch, summarise."""
    from membercare.campaigns import load_campaign
    from membercare.models import Channel

    load_campaign(name, state.settings)  # unknown names fail here, before Prefect starts
    try:
        channels = [Channel(c) for c in channel] if channel else None
    except ValueError:
        raise InputError(f"--channel must be one of email, sms, push (got {', '.join(channel)})") from None
    if schedule:
        _schedule_checks(as_of, dry_run)
    else:
        _refuse_future(as_of, dry_run)
    from flows.campaign import CampaignRunParameters, run_campaign

    try:
        params = CampaignRunParameters(campaign=name, as_of=as_of, dry_run=dry_run, limit=limit, channels=channels,
                                       occurrence_tag=tag, segment_params=parse_params(param or []), resume=resume)
    except Exception as exc:  # noqa: BLE001 - pydantic ValidationError: one line per problem
        raise InputError(str(exc).replace("\n", "; ")) from None
    if schedule:
        from membercare.cli.schedule import schedule_campaign_run
        from membercare.timeutil import parse_as_of, shop_date_label

        at = parse_as_of(str(as_of), state.settings.shop_timezone)
        fr, deployment = schedule_campaign_run(params, at)
        console.print(f"scheduled flow run {fr.name} ({fr.id}) of deployment run-campaign/{deployment} at "
                      f"{shop_date_label(at, state.settings.shop_timezone)}; nothing was sent now")
        console.print("it sends when a worker of the deployment's pool runs it; cancel it in the Prefect UI "
                      "(flow runs, Scheduled) before then to send nothing")
        return
    result = run_campaign(params)
    title = f"{name} · {result['occurrence']}" + (" · dry run" if dry_run else f" · run {result['status']}")
    console.print(summary_table(result, title))
    if dry_run:
        if result.get("already_planned"):
            console.print(f"{result['already_planned']:,} members are already planned for this occurrence "
                          "(a real run sends them nothing)")
        if result.get("line_quota"):
            style = "bold red" if result.get("line_quota_exceeded") else "default"
            console.print(f"[{style}]{result['line_quota']}[/]")
        if samples:
            for s in result.get("samples", []):
                console.print(f"[bold]{s['channel']}[/] member id {s['member_id']} · {s['detail']}\n"
                              f"  [italic]{s['headline']}[/]\n  {s['body']}")
    if result.get("status_reason"):
        console.print(f"run {result['status']}: {result['status_reason']}")
    if not dry_run and result["newly_planned"] == 0 and result["planned"]:
        console.print("nothing new to send: this occurrence was already planned (the outbox keys prevent duplicates)")


@campaign_app.command("estimate")
def estimate_cmd(
    name: str = typer.Argument(..., help="Campaign name (a folder of templates/)."),
    as_of: str = typer.Option(None, "--as-of",
                              help="Date (start of that day, shop time) or ISO datetime; default now."),
    channel: list[str] = typer.Option(None, "--channel", help="Only this channel of the campaign's (repeatable)."),
    tag: str = typer.Option(None, "--tag", help="Occurrence tag (separates several schedules of one campaign)."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Segment parameter NAME=VALUE (repeatable)."),
    render: bool = typer.Option(False, "--render", help="Render every message too (slower; finds template errors)."),
) -> None:
    """Who the campaign would reach, per channel, after consent, reachability, holdout, frequency cap and quiet
    hours, and the smallest lift its holdout can detect. Writes nothing; does not start Prefect."""
    import dataclasses

    from channels.registry import unconfigured_channels
    from membercare.campaigns.estimate import estimate
    from membercare.campaigns.occurrence import RunOptions, prepare
    from membercare.cli.common import provider_env
    from membercare.models import Channel
    from membercare.timeutil import parse_as_of

    settings = state.settings
    try:
        channels = tuple(Channel(c) for c in channel) if channel else None
    except ValueError:
        known = ", ".join(c.value for c in Channel)
        raise InputError(f"--channel must be one of {known} (got {', '.join(channel)})") from None
    options = RunOptions(as_of=parse_as_of(as_of, settings.shop_timezone) if as_of else None, dry_run=True,
                         channels=channels, occurrence_tag=tag, segment_params=parse_params(param or []), samples=0)
    prepared = prepare(settings, name, options)
    env = provider_env()
    # As the run does: a channel whose provider this shop has not set up is not used.
    missing = unconfigured_channels(prepared.spec.channels, env)
    keep = tuple(c for c in prepared.spec.channels if c not in missing)
    if missing and keep:
        prepared = dataclasses.replace(prepared, spec=dataclasses.replace(prepared.spec, channels=keep))
    est = estimate(migrated_engine(), prepared, render=render)
    console.print(estimate_table(est, settings.shop_timezone))
    for line in estimate_notes(est):
        console.print(line)
    if missing and keep:
        console.print(f"not used: {', '.join(c.value for c in missing)} (no provider credentials set up)")
    quota_note = line_quota_note(est, env)
    if quota_note:
        console.print(quota_note)


def line_quota_note(est, env: dict[str, str]) -> str | None:
    """LINE counts messages against a monthly quota: say when this occurrence would go over what is left."""
    wanted = est.now.get("line", 0) + est.later.get("line", 0)
    if not wanted:
        return None
    from channels.registry import build_channels, close_channels
    from membercare.models import Channel

    try:
        built = build_channels(env, channels=[Channel.LINE])
    except Exception as exc:  # noqa: BLE001 - the estimate stands without the quota; say why it is missing
        return f"LINE quota not checked ({type(exc).__name__})"
    try:
        quota = built[Channel.LINE].quota()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - as above
        return f"LINE quota not checked ({type(exc).__name__})"
    finally:
        close_channels(built)
    if quota.remaining is None:
        return f"LINE quota: no monthly limit set ({quota.used:,} messages sent this month)"
    if wanted > quota.remaining:
        return (f"[bold red]LINE quota: {wanted:,} LINE messages wanted but only {quota.remaining:,} of "
                f"{quota.limit:,} left this month[/]: LINE refuses messages beyond it (HTTP 429); narrow the "
                f"audience or raise the plan")
    return f"LINE quota: {wanted:,} of the {quota.remaining:,} messages left this month"


def estimate_table(est, timezone: str) -> Table:
    from membercare.timeutil import shop_date_label

    t = Table(title=f"{est.campaign} · {est.occurrence} · estimate as of {shop_date_label(est.as_of, timezone)}",
              show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("segment size", f"{est.segment_size:,}")
    if est.already_planned:
        t.add_row("already planned for this occurrence", f"{est.already_planned:,}")
    for reason, n in sorted(est.excluded.items(), key=lambda kv: -kv[1]):
        t.add_row(f"  no message: {reason}", f"{n:,}")
    from membercare.models import Channel

    for ch in (c.value for c in Channel):
        if est.now.get(ch) or est.later.get(ch):
            t.add_row(f"via {ch}", f"{est.now.get(ch, 0) + est.later.get(ch, 0):,}")
            if est.later.get(ch):
                t.add_row("  of which later (quiet hours, send time)", f"{est.later[ch]:,}")
    t.add_row("messages in total", f"{est.messaged:,}")
    return t


def estimate_notes(est) -> list[str]:
    from membercare.campaigns.estimate import ALPHA, POWER

    lines = []
    if est.mde is None:
        lines.append("minimum detectable lift: no holdout in this occurrence, so no lift can be measured")
    else:
        rel = f" ({est.mde_relative:.0%} of the baseline)" if est.mde_relative is not None else ""
        lines.append(f"minimum detectable lift: {est.mde * 100:.2f} points of 7-day conversion{rel} "
                     f"with {est.holdout:,} held out vs {est.messaged:,} messaged; baseline "
                     f"{est.baseline_rate:.2%} (alpha {ALPHA:.0%} two-sided, power {POWER:.0%})")
    lines.append(f"estimated in {est.elapsed_s:.1f} s; nothing was written or sent")
    return lines


@campaign_app.command("test")
def test_cmd(
    name: str = typer.Argument(..., help="Campaign name (a folder of templates/)."),
    to: list[str] = typer.Option(..., "--to", help="Seed addresses: comma-separated emails, E.164 numbers and "
                                                   "push:<token>, @FILE with one per line, or the NAME of a seed "
                                                   "list (seeds/NAME.txt) (repeatable)."),
    member: str = typer.Option(None, "--member", help="Render for this member (external id or database id); "
                                                      "default: the template gallery's sample member."),
) -> None:
    """Send every channel, locale and variant of a campaign to a seed list through the real providers.

    Marked [TEST]; never written to the ledger, so caps, reports and optimisation never count them."""
    from channels.registry import build_channels, close_channels
    from membercare.campaigns.seed_send import accepted_count, plan_test, send_test
    from membercare.cli.common import provider_env

    settings = state.settings
    engine = migrated_engine() if member is not None else None
    plan = plan_test(settings, name, to, engine=engine, member=member)
    adapters = build_channels(provider_env(), channels=plan.channels) if plan.channels else {}
    try:
        sent = send_test(settings, plan.campaign, plan.seeds, adapters, engine=engine, member_id=plan.member_id)
    finally:
        close_channels(adapters)
    t = Table(title=f"{name} · test send to {len(plan.seeds)} seed address(es)")
    for col in ("channel", "locale", "variant", "seed", "outcome", "headline"):
        t.add_column(col)
    for s in sent:
        t.add_row(s.channel, s.locale, s.variant or "-", str(s.seed), s.outcome, s.headline)
    console.print(t)
    ok = accepted_count(sent)
    console.print(f"{ok} of {len(sent)} test messages accepted; none is in the ledger, caps or reports")
    if ok < len(sent):
        raise typer.Exit(1)
