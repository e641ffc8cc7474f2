"""Twilio, the SMS provider, as one plug-in folder.

* ``adapter.py``: :class:`~channels.twilio.adapter.TwilioSmsChannel` on the official SDK, its configuration
  (``MEMBERCARE_TWILIO_*``) and the message list used by reconciliation;
* ``webhooks.py``: ``X-Twilio-Signature`` and the receiver's endpoints ``POST /webhooks/twilio/status``
  (status callbacks) and ``POST /webhooks/twilio/inbound`` (STOP / START / HELP, answered in TwiML);
* ``events.py``: status callbacks and inbound messages -> engagement events, the keyword lists;
* ``sandbox.py``: the Messages API wire format the provider sandbox (``membercare/sandbox/``) speaks.

:data:`PROVIDER` is what ``channels.registry`` registers under the name ``"twilio"``.
"""

from __future__ import annotations

from channels.base import ProviderBase
from channels.twilio.adapter import ENV_ACCOUNT_SID, ENV_AUTH_TOKEN, TwilioConfig, TwilioSmsChannel
from channels.twilio.webhooks import TwilioInboundWebhook, TwilioStatusWebhook
from membercare.models import Channel


class TwilioProvider(ProviderBase):
    """SMS through Twilio (:class:`channels.base.Provider`). Any non-empty auth token may be valid: a wrong
    one shows as 403s on every callback."""

    name = "twilio"
    channel = Channel.SMS
    primary_env = ENV_ACCOUNT_SID
    config_type = TwilioConfig
    adapter_type = TwilioSmsChannel
    webhook_secret_env = ENV_AUTH_TOKEN  # the account's auth token signs its webhooks
    webhook_types = (TwilioStatusWebhook, TwilioInboundWebhook)


PROVIDER = TwilioProvider()
