"""An HTML gallery of every campaign x channel x locale (x template variant), for marketers to review in a browser.

One self-contained ``index.html``: each email in an ``<iframe srcdoc>`` (so its CSS cannot leak into
the page) under its subject and preheader, each SMS as a phone bubble with encoding, segment count and
estimated cost, each push as a notification card. Messages are rendered for the sample members, with
preview-only links. A campaign with a variant test (``optimise.variants``) gets one row per variant and
locale, labelled with the variant, so that every copy that can be sent is reviewed before it is.
Template problems are listed at the top and in place of the failing message.
"""

from __future__ import annotations

import html
from pathlib import Path

from membercare.campaigns.definition import Campaign, campaign_names, load_campaign
from membercare.config import Settings
from membercare.delivery.contract import EmailContent, LineContent, PushContent, SmsContent
from membercare.links import LinkSigner
from membercare.rendering.check import Problem, check_campaign
from membercare.rendering.engine import RenderError, TemplateStore
from membercare.rendering.renderer import CampaignRenderer
from membercare.rendering.samples import SAMPLE_AS_OF, sample_context

_CSS = """
* { box-sizing: border-box; }
body { margin: 0; font-family: -apple-system, 'Segoe UI', 'Noto Sans TC', 'PingFang TC', Helvetica, Arial, sans-serif;
       background: #eceff1; color: #1f2933; }
header.top { padding: 20px 32px; background: #1f2933; color: #fff; }
header.top h1 { margin: 0 0 4px 0; font-size: 22px; }
header.top p { margin: 0; color: #cbd2d9; font-size: 14px; }
nav { padding: 12px 32px; background: #fff; border-bottom: 1px solid #d9e2ec; font-size: 14px; }
nav a { margin-right: 14px; color: #2f6f5e; }
section.campaign { margin: 24px 32px; padding: 20px 24px; background: #fff; border-radius: 10px;
                   box-shadow: 0 1px 3px rgba(0,0,0,.08); }
section.campaign > h2 { margin: 0 0 4px 0; font-size: 20px; }
.meta { margin: 0 0 16px 0; color: #52606d; font-size: 13px; }
.badge { display: inline-block; padding: 2px 8px; margin-right: 6px; border-radius: 10px; background: #e4e7eb;
         font-size: 12px; color: #323f4b; }
.badge.marketing { background: #fde8e4; color: #9b2c1d; }
.badge.transactional { background: #e3f2ec; color: #1f5e4b; }
.badge.ok { background: #e3f2ec; color: #1f5e4b; }
.badge.err { background: #fce8e6; color: #a61b1b; }
.locale { display: grid; grid-template-columns: minmax(320px, 640px) 300px 340px 300px; gap: 20px; align-items: start;
          padding: 16px 0; border-top: 1px solid #e4e7eb; }
.locale > h3 { grid-column: 1 / -1; margin: 0; font-size: 15px; color: #52606d; }
.label { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: #7b8794; margin: 0 0 6px 0; }
.email .subject { font-weight: 600; font-size: 15px; margin: 0 0 2px 0; }
.email .preheader { color: #7b8794; font-size: 13px; margin: 0 0 8px 0; }
.email iframe { width: 100%; height: 720px; border: 1px solid #d9e2ec; border-radius: 6px; background: #fff; }
.phone { background: #f5f7fa; border: 1px solid #d9e2ec; border-radius: 24px; padding: 18px 14px; min-height: 160px; }
.bubble { background: #e5e5ea; color: #111; border-radius: 18px; border-bottom-left-radius: 4px; padding: 10px 14px;
          font-size: 15px; line-height: 1.4; white-space: pre-wrap; word-break: break-word; }
.smsmeta { margin-top: 8px; font-size: 12px; color: #52606d; }
.push { background: rgba(255,255,255,.92); border: 1px solid #d9e2ec; border-radius: 14px; padding: 12px 14px;
        box-shadow: 0 4px 14px rgba(0,0,0,.08); }
.push .app { font-size: 12px; color: #7b8794; margin-bottom: 4px; }
.push .title { font-weight: 600; font-size: 15px; }
.push .body { font-size: 14px; margin-top: 2px; }
.push .data { margin-top: 8px; font-family: Menlo, Consolas, monospace; font-size: 11px; color: #52606d;
              word-break: break-all; }
.problem { color: #a61b1b; font-size: 13px; background: #fce8e6; padding: 8px 10px; border-radius: 6px; }
.none { color: #9aa5b1; font-size: 13px; font-style: italic; }
ul.problems { margin: 8px 0 0 0; padding-left: 20px; font-size: 13px; color: #a61b1b; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _email(c: EmailContent) -> str:
    headers = "".join(f"<div class='meta'>{_e(k)}: {_e(v)}</div>" for k, v in c.headers.items())
    return (f"<div class='email'><p class='label'>Email</p><p class='subject'>{_e(c.subject)}</p>"
            f"<p class='preheader'>{_e(c.preheader or '')}</p>"
            f"<iframe title='{_e(c.subject)}' sandbox='' srcdoc=\"{_e(c.html)}\"></iframe>{headers}</div>")


def _sms(c: SmsContent, cost: str) -> str:
    return (f"<div><p class='label'>SMS</p><div class='phone'><div class='bubble'>{_e(c.body)}</div>"
            f"<div class='smsmeta'>{_e(c.encoding)} · {c.segments} segment{'s' if c.segments != 1 else ''}"
            f" · {len(c.body)} characters · est. {_e(cost)}</div></div></div>")


def _push(c: PushContent, app: str) -> str:
    data = ", ".join(f"{k}={v}" for k, v in c.data.items())
    return (f"<div><p class='label'>Push</p><div class='push'><div class='app'>{_e(app)} · now</div>"
            f"<div class='title'>{_e(c.title)}</div><div class='body'>{_e(c.body)}</div>"
            f"<div class='data'>{_e(data)}</div></div></div>")


def _line(c: LineContent) -> str:
    flex = (f"<div class='data'>+ Flex message ({_e(c.alt_text or '')}, {len(c.flex_json.encode('utf-8'))} bytes)"
            f"</div>" if c.flex_json else "")
    return (f"<div><p class='label'>LINE</p><div class='phone'><div class='bubble line'>{_e(c.text)}</div>"
            f"<div class='smsmeta'>{len(c.text)} characters</div>{flex}</div></div>")


def campaign_variants(campaign: Campaign) -> list[str | None]:
    """The template variants a reviewer must see: every variant of the campaign's test, or the plain copy."""
    test = campaign.optimise.variants
    return list(test.names) if test is not None else [None]


def _locale_block(renderer: CampaignRenderer, campaign: Campaign, ctx: dict, locale: str, tv: str | None,
                  app: str) -> str:
    cells = {}
    for channel in ("email", "sms", "push", "line"):
        if channel not in [c.value for c in campaign.channels]:
            cells[channel] = f"<div><p class='label'>{channel}</p><p class='none'>not used</p></div>"
            continue
        try:
            c = renderer.render(channel, ctx, as_of=SAMPLE_AS_OF, message_id="preview-0001", variant=tv)
        except RenderError as exc:
            cells[channel] = f"<div><p class='label'>{channel}</p><div class='problem'>{_e(exc)}</div></div>"
            continue
        if isinstance(c, EmailContent):
            cells[channel] = _email(c)
        elif isinstance(c, SmsContent):
            fmt = renderer.formatter(locale, locale, None)
            cells[channel] = _sms(c, fmt.money(renderer.sms_cost_minor(c)))
        elif isinstance(c, LineContent):
            cells[channel] = _line(c)
        else:
            cells[channel] = _push(c, app)
    label = ""
    if tv is not None:
        test = campaign.optimise.variants
        control = " (control)" if test is not None and tv == test.control else ""
        label = f" · <span class='badge variant' data-variant='{_e(tv)}'>variant {_e(tv)}{control}</span>"
    return (f"<div class='locale'><h3>{_e(locale)}{label} · sample member "
            f"{_e(ctx['member']['name'])}</h3>{''.join(cells.values())}</div>")


def build_gallery(settings: Settings | None = None, *, campaigns: list[str] | None = None,
                  variant: str = "typical") -> str:
    """The gallery page as a string."""
    settings = settings or Settings.from_env()
    store = TemplateStore(settings.templates_dir, shop_locale=settings.shop_locale)
    signer = LinkSigner.preview()
    names = campaigns or campaign_names(settings.templates_dir)
    sections, nav, total_errors = [], [], 0
    for name in names:
        problems: list[Problem] = check_campaign(name, settings, store=store, signer=signer)
        errors = [p for p in problems if p.severity == "error"]
        total_errors += len(errors)
        nav.append(f"<a href='#{_e(name)}'>{_e(name)}</a>")
        try:
            campaign = load_campaign(name, settings)
        except Exception as exc:  # noqa: BLE001 - shown in the page
            sections.append(f"<section class='campaign' id='{_e(name)}'><h2>{_e(name)}</h2>"
                            f"<div class='problem'>{_e(exc)}</div></section>")
            continue
        renderer = CampaignRenderer(campaign, settings, signer=signer, store=store)
        app = renderer.shop_view(campaign.default_locale).get("name", "")
        status = (f"<span class='badge err'>{len(errors)} error(s)</span>" if errors
                  else "<span class='badge ok'>check passed</span>")
        target = (f"segment {campaign.segment.name}" if campaign.segment
                  else f"event {campaign.trigger.event}" if campaign.trigger else "no audience")
        head = (f"<h2>{_e(name)}</h2><p class='meta'><span class='badge {campaign.purpose.value}'>"
                f"{campaign.purpose.value}</span>{status}{_e(campaign.description)} · {_e(target)} · "
                f"priority {campaign.priority} · {campaign.occurrence} per {campaign.message_per}</p>")
        if problems:
            head += "<ul class='problems'>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"
        blocks = []
        variants = campaign_variants(campaign)
        for locale in campaign.locales:
            ctx = sample_context(renderer.builder, locale, variant)
            for tv in variants:
                blocks.append(_locale_block(renderer, campaign, ctx, locale, tv, app))
        sections.append(f"<section class='campaign' id='{_e(name)}'>{head}{''.join(blocks)}</section>")
    summary = (f"{len(names)} campaigns · {total_errors} template error(s)" if total_errors
               else f"{len(names)} campaigns · all templates pass the check")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>membercare template gallery</title>"
            f"<style>{_CSS}</style></head><body><header class='top'><h1>Template gallery</h1>"
            f"<p>{_e(summary)} · rendered for sample members as of {SAMPLE_AS_OF:%Y-%m-%d} · links are preview-only</p>"
            f"</header><nav>{''.join(nav)}</nav>{''.join(sections)}</body></html>")


def write_gallery(out: Path, settings: Settings | None = None, *, campaigns: list[str] | None = None,
                  variant: str = "typical") -> Path:
    """:func:`build_gallery` written to ``out/index.html`` (``out`` is created); returns that path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(build_gallery(settings, campaigns=campaigns, variant=variant), encoding="utf-8")
    return path
