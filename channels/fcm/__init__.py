"""Firebase Cloud Messaging, the push provider, as one plug-in folder.

* ``adapter.py``: :class:`~channels.fcm.adapter.FirebasePushChannel` on firebase-admin and its
  configuration (``MEMBERCARE_FIREBASE_CREDENTIALS``, ``MEMBERCARE_FCM_BASE_URL``);
* ``webhooks.py``: FCM reports nothing back, so the shop's app does: the signed ``POST /track/push``
  endpoint (HMAC-SHA256 under ``MEMBERCARE_PUSH_TRACKING_SECRET``);
* ``events.py``: app push reports -> engagement events;
* ``sandbox.py``: the FCM v1 and OAuth wire formats the provider sandbox (``membercare/sandbox/``) speaks.

:data:`PROVIDER` is what ``channels.registry`` registers under the name ``"fcm"``.
"""

from __future__ import annotations

from channels.base import ProviderBase
from channels.fcm.adapter import ENV_CREDENTIALS, FirebaseConfig, FirebasePushChannel
from channels.fcm.webhooks import ENV_TRACKING_SECRET, PushTrackingWebhook
from membercare.models import Channel


class FirebaseProvider(ProviderBase):
    """Push through FCM (:class:`channels.base.Provider`); the app's reports are its webhook. Any non-empty
    shared secret will do (the app and the receiver must simply agree)."""

    name = "fcm"
    channel = Channel.PUSH
    primary_env = ENV_CREDENTIALS
    config_type = FirebaseConfig
    adapter_type = FirebasePushChannel
    webhook_secret_env = ENV_TRACKING_SECRET
    webhook_types = (PushTrackingWebhook,)


PROVIDER = FirebaseProvider()
