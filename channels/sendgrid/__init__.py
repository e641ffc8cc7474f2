"""SendGrid, the email provider, as one plug-in folder.

* ``adapter.py``: :class:`~channels.sendgrid.adapter.SendGridEmailChannel` on the official SDK and its
  configuration (``MEMBERCARE_SENDGRID_*``);
* ``webhooks.py``: the Signed Event Webhook (signing, verification) and the receiver's endpoint
  ``POST /webhooks/sendgrid``;
* ``events.py``: Event Webhook payloads -> engagement events;
* ``sandbox.py``: the Mail Send wire format the provider sandbox (``membercare/sandbox/``) speaks.

:data:`PROVIDER` is what ``channels.registry`` registers under the name ``"sendgrid"``.
"""

from __future__ import annotations

from channels.base import ProviderBase
from channels.sendgrid.adapter import ENV_API_KEY, SendGridConfig, SendGridEmailChannel
from channels.sendgrid.webhooks import ENV_WEBHOOK_PUBLIC_KEY, SendGridEventWebhook, check_public_key
from membercare.models import Channel


class SendGridProvider(ProviderBase):
    """Email through SendGrid (:class:`channels.base.Provider`)."""

    name = "sendgrid"
    channel = Channel.EMAIL
    primary_env = ENV_API_KEY
    config_type = SendGridConfig
    adapter_type = SendGridEmailChannel
    webhook_secret_env = ENV_WEBHOOK_PUBLIC_KEY
    webhook_types = (SendGridEventWebhook,)

    def check_webhook_secret(self, secret: str) -> None:
        check_public_key(secret)


PROVIDER = SendGridProvider()
