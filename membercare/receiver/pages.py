"""Member-facing text of the receiver: the unsubscribe / preference page and SMS keyword replies.

Languages: Traditional Chinese (``zh-TW``, the shop's default) and English. A member's locale picks
the language; anything else falls back to the language family, then to English. Adding a language is
adding one entry to :data:`TEXT` and :data:`SMS_TEXT`.

The page is server-rendered HTML with one form and no JavaScript or third-party assets: it must work
from any mail client's browser, and it posts back to the same signed URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from jinja2 import Environment

from membercare.models import Channel, Purpose

TEXT: dict[str, dict[str, str]] = {
    "zh-TW": {
        "title": "訂閱偏好設定",
        "hello": "{name} 您好，這裡可以設定 {shop} 寄給您的訊息。",
        "account": "帳號",
        "channel.email": "電子郵件",
        "channel.sms": "簡訊",
        "channel.push": "App 推播",
        "channel.line": "LINE",
        "line_linked": "LINE 帳號已綁定：勾選的訊息也會透過 LINE 傳送給您。",
        "line_not_linked": "尚未綁定 LINE 帳號：加入 {shop} 的 LINE 官方帳號並傳送「綁定」，即可綁定。",
        "purpose.marketing": "優惠與活動",
        "purpose.transactional": "訂單與帳戶通知",
        "always": "必要通知，一律寄送",
        "save": "儲存設定",
        "saved": "已儲存您的設定。",
        "unsubscribe_button": "取消所有{channel}優惠訊息",
        "unsubscribe_all_button": "取消所有優惠訊息",
        "unsubscribed": "已為您取消{channel}優惠訊息，之後不會再收到。",
        "unsubscribed_all": "已為您取消所有優惠訊息，之後不會再收到。",
        "invalid": "這個連結無效或已失效。",
        "not_found": "找不到這個會員。",
        "channel.all": "所有管道",
    },
    "en": {
        "title": "Message preferences",
        "hello": "Hello {name}, choose which messages {shop} sends you.",
        "account": "Account",
        "channel.email": "Email",
        "channel.sms": "SMS",
        "channel.push": "App notifications",
        "channel.line": "LINE",
        "line_linked": "Your LINE account is linked: the messages you choose can also reach you on LINE.",
        "line_not_linked": "LINE is not linked yet: add {shop}'s LINE Official Account and send it \"link\".",
        "purpose.marketing": "Offers and news",
        "purpose.transactional": "Orders and account",
        "always": "Required, always sent",
        "save": "Save preferences",
        "saved": "Your preferences are saved.",
        "unsubscribe_button": "Unsubscribe from all {channel} offers",
        "unsubscribe_all_button": "Unsubscribe from all offers",
        "unsubscribed": "You are unsubscribed from {channel} offers and will not receive them any more.",
        "unsubscribed_all": "You are unsubscribed from all offers and will not receive them any more.",
        "invalid": "This link is not valid.",
        "not_found": "We could not find this member.",
        "channel.all": "all channels",
    },
}

SMS_TEXT: dict[str, dict[str, str]] = {
    "zh-TW": {
        "help": "{shop}會員通知。回覆STOP或「退訂」取消優惠簡訊，回覆START重新訂閱。{support}",
        "support": "客服：{contact}",
        "stopped": "{shop}：已取消優惠簡訊，之後不會再收到。回覆START可重新訂閱。",
        "started": "{shop}：已重新訂閱優惠簡訊。回覆STOP可隨時取消。",
    },
    "en": {
        "help": "{shop} member messages. Reply STOP to opt out of offers, START to opt back in. {support}",
        "support": "Help: {contact}",
        "stopped": "{shop}: you will no longer receive offers by SMS. Reply START to opt back in.",
        "started": "{shop}: you are subscribed to offers by SMS again. Reply STOP to opt out.",
    },
}

# Transactional email (receipts, password resets) is part of the service: it cannot be switched off.
LOCKED: frozenset[tuple[str, str]] = frozenset({(Channel.EMAIL.value, Purpose.TRANSACTIONAL.value)})
CHANNELS = (Channel.EMAIL.value, Channel.SMS.value, Channel.PUSH.value, Channel.LINE.value)
PURPOSES = (Purpose.MARKETING.value, Purpose.TRANSACTIONAL.value)


def language(locale: str | None, table: Mapping[str, object] = TEXT) -> str:
    """The best language of ``table`` for ``locale`` (exact, then family, then English)."""
    if locale:
        if locale in table:
            return locale
        family = locale.replace("_", "-").split("-")[0].lower()
        for key in table:
            if key.split("-")[0].lower() == family:
                return key
    return "en"


def sms_reply(kind: str, locale: str | None, *, shop: str, support: str | None) -> str:
    t = SMS_TEXT[language(locale, SMS_TEXT)]
    support_text = t["support"].format(contact=support) if support else ""
    return t[kind].format(shop=shop, support=support_text).strip()


_ENV = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
_PAGE = _ENV.from_string("""<!doctype html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<title>{{ t.title }} · {{ shop }}</title>
<style>
 body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans TC","PingFang TC",sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;color:#222;line-height:1.5}
 h1{font-size:1.4rem} .note{padding:.75rem 1rem;border-radius:.5rem;background:#eef7ee;border:1px solid #b9dcb9}
 .err{background:#fbeeee;border-color:#e3b5b5} table{border-collapse:collapse;width:100%;margin:1rem 0}
 th,td{padding:.5rem;border-bottom:1px solid #ddd;text-align:left} td.c{text-align:center}
 button{font-size:1rem;padding:.6rem 1.2rem;border-radius:.4rem;border:1px solid #555;background:#fff;cursor:pointer}
 button.primary{background:#222;color:#fff} .muted{color:#666;font-size:.9rem}
</style>
</head>
<body>
<h1>{{ t.title }}</h1>
{% if error %}
<p class="note err">{{ error }}</p>
{% else %}
{% if notice %}<p class="note" role="status">{{ notice }}</p>{% endif %}
<p>{{ hello }}</p>
{% if account %}<p class="muted">{{ t.account }}: {{ account }}</p>{% endif %}
<form method="post" action="{{ action }}">
 <input type="hidden" name="action" value="unsubscribe">
 <button type="submit">{{ unsubscribe_label }}</button>
</form>
<form method="post" action="{{ action }}">
 <input type="hidden" name="action" value="save">
 <table>
  <thead><tr><th></th>{% for p in purposes %}<th>{{ t["purpose." ~ p] }}</th>{% endfor %}</tr></thead>
  <tbody>
  {% for c in channels %}
   <tr><th scope="row">{{ t["channel." ~ c] }}</th>
   {% for p in purposes %}
    {% if (c, p) in locked %}
     <td class="c muted">{{ t.always }}</td>
    {% else %}
     <td class="c"><input type="checkbox" name="consent.{{ c }}.{{ p }}" aria-label="{{ t["channel." ~ c] }} {{ t["purpose." ~ p] }}"{% if state.get((c, p)) %} checked{% endif %}></td>
    {% endif %}
   {% endfor %}
   </tr>
  {% endfor %}
  </tbody>
 </table>
 {% if line_status %}<p class="muted">{{ line_status }}</p>{% endif %}
 <button class="primary" type="submit">{{ t.save }}</button>
</form>
{% endif %}
</body>
</html>
""")


@dataclass(frozen=True)
class PageModel:
    locale: str | None
    shop: str
    action: str
    name: str = ""
    account: str = ""
    scope: str = "all"
    state: Mapping[tuple[str, str], bool] | None = None
    notice: str | None = None
    error_key: str | None = None
    line_linked: bool | None = None  # None: not shown (no member)


def render_page(model: PageModel) -> str:
    lang = language(model.locale)
    t = TEXT[lang]
    if model.scope == "all":
        unsubscribe_label = t["unsubscribe_all_button"]
    else:
        unsubscribe_label = t["unsubscribe_button"].format(channel=t[f"channel.{model.scope}"])
    return _PAGE.render(
        lang=lang, t=t, shop=model.shop, action=model.action, account=model.account,
        hello=t["hello"].format(name=model.name or "", shop=model.shop),
        unsubscribe_label=unsubscribe_label, channels=CHANNELS, purposes=PURPOSES, locked=LOCKED,
        state=dict(model.state or {}), notice=model.notice, error=t[model.error_key] if model.error_key else None,
        line_status=None if model.line_linked is None else (
            t["line_linked"] if model.line_linked else t["line_not_linked"].format(shop=model.shop)),
    )


def notice_text(key: str, locale: str | None, scope: str) -> str:
    t = TEXT[language(locale)]
    if key == "unsubscribed" and scope == "all":
        return t["unsubscribed_all"]
    return t[key].format(channel=t.get(f"channel.{scope}", scope))
