"""``membercare templates ...``: check, preview and browse the message templates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, err_console, state
from membercare.errors import InputError, MembercareError

if TYPE_CHECKING:
    from membercare.campaigns.definition import Campaign


class TemplateCheckFailed(MembercareError):
    """``templates check`` found errors (already listed above the one-line summary)."""

templates_app = typer.Typer(help="Message templates: pre-flight check, preview for a member, HTML gallery.",
                            no_args_is_help=True)
app.add_typer(templates_app, name="templates")


@templates_app.command("list")
def list_cmd() -> None:
    """List the campaigns of the templates folder."""
    from membercare.campaigns import list_campaigns

    t = Table(title=f"Campaigns in {state.settings.templates_dir}")
    for col in ("campaign", "purpose", "audience", "channels", "occurrence", "priority", "locales"):
        t.add_column(col)
    for c in list_campaigns(state.settings):
        audience = (f"segment {c.segment.name}" if c.segment else f"event {c.trigger.event}" if c.trigger else "-")
        t.add_row(c.name, c.purpose.value, audience, ",".join(ch.value for ch in c.channels),
                  f"{c.occurrence}/{c.message_per}", str(c.priority), ",".join(c.locales))
    console.print(t)


@templates_app.command("check")
def check_cmd(
    campaign: list[str] = typer.Option(None, "--campaign", "-c", help="Check only this campaign (repeatable)."),
    db: bool = typer.Option(False, "--db", help="Also render for real members from the database."),
    members: int = typer.Option(10, "--members", help="With --db: members per locale to render."),
) -> None:
    """Render every campaign x channel x locale and report problems; exit 1 on any error."""
    from membercare.campaigns import campaign_names
    from membercare.rendering.check import check_all

    names = list(campaign or []) or campaign_names(state.settings.templates_dir)
    known = set(campaign_names(state.settings.templates_dir))
    for n in names:
        if n not in known:
            from membercare.errors import UnknownNameError

            raise UnknownNameError("campaign", n, known)
    if db:
        from membercare.cli.common import migrated_engine

        with migrated_engine().connect() as conn:
            results = check_all(state.settings, conn=conn, campaigns=names, db_members=members)
    else:
        results = check_all(state.settings, campaigns=names)
    errors = warnings = 0
    for name, problems in results.items():
        e = sum(p.severity == "error" for p in problems)
        w = len(problems) - e
        errors, warnings = errors + e, warnings + w
        mark = "[green]ok[/]" if not e else f"[red]{e} error(s)[/]"
        console.print(f"{name}: {mark}" + (f", {w} warning(s)" if w else ""))
        for p in problems:
            colour = "red" if p.severity == "error" else "yellow"
            console.print(f"  [{colour}]{p}[/]", markup=True, highlight=False, soft_wrap=True)
    console.print(f"{len(results)} campaign(s), {errors} error(s), {warnings} warning(s)")
    if errors:
        # A MembercareError: the app's main() prints it as one line and exits 1.
        failed = sum(1 for ps in results.values() if any(p.severity == "error" for p in ps))
        raise TemplateCheckFailed(f"template check failed: {errors} error(s) in {failed} campaign(s)")


def _check_variant(campaign: Campaign, variant: str | None) -> None:
    """A usage error (exit 2) for a variant the campaign does not declare, naming the ones it does."""
    if variant is None:
        return
    test = campaign.optimise.variants
    if test is None:
        raise typer.BadParameter(f"campaign {campaign.name} has no variant test (optimise.variants), so no variant "
                                 f"{variant!r}; preview without --variant", param_hint="'--variant'")
    if variant not in test.names:
        raise typer.BadParameter(f"campaign {campaign.name} has no variant {variant!r}; its variants are "
                                 f"{', '.join(test.names)}", param_hint="'--variant'")


@templates_app.command("preview")
def preview_cmd(
    campaign: str = typer.Argument(..., help="Campaign name."),
    member: str = typer.Option(None, "--member", "-m", help="The shop's member id (external id)."),
    sample: str = typer.Option(None, "--sample", help="Use a sample member instead: a locale, e.g. zh-TW or en."),
    channel: str = typer.Option(None, "--channel", help="email, sms or push (default: every channel of the campaign)."),
    html: Path = typer.Option(None, "--html", help="Also write the email HTML to this file."),
    as_of: str = typer.Option(None, "--as-of", help="Render as of this date/time (default now)."),
    variant: str = typer.Option(None, "--variant", help="A template variant of the campaign's variant test "
                                "(optimise.variants.names): render its parts (@VARIANT files), not the plain ones."),
) -> None:
    """Print a campaign's message for one member: subject and text, SMS with segments, push."""
    from membercare.campaigns import load_campaign
    from membercare.delivery.contract import EmailContent, PushContent, SmsContent
    from membercare.links import LinkSigner
    from membercare.models import Channel
    from membercare.rendering.renderer import CampaignRenderer
    from membercare.rendering.samples import SAMPLE_AS_OF, sample_context
    from membercare.timeutil import parse_as_of

    settings = state.settings
    c = load_campaign(campaign, settings)
    _check_variant(c, variant)
    signer = LinkSigner.from_settings(settings, allow_preview=True)
    renderer = CampaignRenderer(c, settings, signer=signer)
    if (member is None) == (sample is None):
        raise InputError("give either --member ID or --sample LOCALE")
    if member is not None:
        import sqlalchemy as sa

        from membercare.cli.common import migrated_engine
        from membercare.models import Member

        when = parse_as_of(as_of, settings.shop_timezone)
        with migrated_engine().connect() as conn:
            mid = conn.execute(sa.select(Member.__table__.c.id)
                               .where(Member.__table__.c.external_id == member)).scalar_one_or_none()
            if mid is None:
                raise InputError(f"no member with id {member!r}")
            ctx = renderer.build_context(conn, [mid], when)[mid]
    else:
        when = parse_as_of(as_of, settings.shop_timezone) if as_of else SAMPLE_AS_OF
        ctx = sample_context(renderer.builder, sample, "typical", when)
    channels = [Channel(channel)] if channel else list(c.channels)
    for ch in channels:
        content = renderer.render(ch, ctx, as_of=when, message_id="preview", variant=variant)
        locale = renderer.template_locale(ch, ctx["member"].get("locale"))
        console.rule(f"{c.name} · {ch.value} · {locale}" + (f" · variant {variant}" if variant else ""))
        if isinstance(content, EmailContent):
            console.print(f"[bold]Subject:[/] {content.subject}", highlight=False)
            if content.preheader:
                console.print(f"[bold]Preheader:[/] {content.preheader}", highlight=False)
            for k, v in content.headers.items():
                console.print(f"[bold]{k}:[/] {v}", highlight=False)
            console.print()
            console.print(content.text, markup=False, highlight=False)
            if html:
                html.write_text(content.html, encoding="utf-8")
                console.print(f"HTML written to {html}")
        elif isinstance(content, SmsContent):
            console.print(content.body, markup=False, highlight=False)
            cost = renderer.formatter(locale, locale, None).money(renderer.sms_cost_minor(content))
            console.print(f"[dim]{content.encoding}, {content.segments} segment(s), {len(content.body)} characters, "
                          f"est. {cost}[/]")
        elif isinstance(content, PushContent):
            console.print(f"[bold]{content.title}[/]", highlight=False)
            console.print(content.body, markup=False, highlight=False)
            console.print(f"[dim]data: {dict(content.data)}[/]", highlight=False)
    if signer.is_preview:
        err_console.print("[dim]note: MEMBERCARE_SECRET_KEY is not set; links are preview-only[/]")


@templates_app.command("gallery")
def gallery_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write index.html into."),
    campaign: list[str] = typer.Option(None, "--campaign", "-c", help="Only this campaign (repeatable)."),
    worst: bool = typer.Option(False, "--worst-case", help="Render for the worst-case sample members."),
) -> None:
    """Write an HTML gallery of every campaign x channel x locale."""
    from membercare.rendering.gallery import write_gallery

    path = write_gallery(out, state.settings, campaigns=list(campaign or []) or None,
                         variant="worst" if worst else "typical")
    console.print(f"Gallery written to {path}")
