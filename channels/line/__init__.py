"""LINE, the fourth channel, as one plug-in folder.

* ``adapter.py``: :class:`~channels.line.adapter.LineChannel` on the official ``line-bot-sdk`` (v3
  Messaging API): push (text and Flex), multicast, ``X-Line-Retry-Key`` from our outbox key, the monthly
  quota; its configuration (``MEMBERCARE_LINE_*``);
* ``webhooks.py``: ``X-Line-Signature`` and the receiver's endpoint ``POST /webhooks/line``;
* ``events.py``: follow, unfollow, message and postback events -> engagement events;
* ``sandbox.py``: the Messaging API wire format and the signed webhooks the provider sandbox
  (``membercare/sandbox/``) speaks.

:data:`PROVIDER` is what ``channels.registry`` registers under the name ``"line"``.
"""

from __future__ import annotations

from channels.base import ConfigurationError, ProviderBase
from channels.line.adapter import ENV_ACCESS_TOKEN, ENV_CHANNEL_SECRET, LineChannel, LineConfig
from channels.line.webhooks import LineWebhook
from membercare.models import Channel


class LineProvider(ProviderBase):
    """LINE pushes (:class:`channels.base.Provider`); webhooks signed with the channel secret."""

    name = "line"
    channel = Channel.LINE
    primary_env = ENV_ACCESS_TOKEN
    config_type = LineConfig
    adapter_type = LineChannel
    webhook_secret_env = ENV_CHANNEL_SECRET
    webhook_types = (LineWebhook,)

    def check_webhook_secret(self, secret: str) -> None:
        # A LINE channel secret is 32 hex digits; anything else would turn every webhook into a 403.
        if len(secret) != 32 or any(c not in "0123456789abcdefABCDEF" for c in secret):
            raise ConfigurationError(f"{ENV_CHANNEL_SECRET} must be the channel secret: 32 hexadecimal digits")


PROVIDER = LineProvider()
