"""The membercare exception tree.

::

    MembercareError                  base of everything we raise on purpose
    ├── ConfigurationError           wrong or missing settings/credentials; never swallowed, never retried
    ├── InputError                   bad user input (CLI arguments, unknown names); one clear line
    │   └── UnknownNameError         an unknown segment, campaign, channel, ... (names the valid choices)
    ├── DataError                    the database holds something that breaks an invariant
    └── DeliveryError                provider-side failures (see ``membercare.delivery``)
        ├── TransientDeliveryError   retry later (5xx, timeouts, 429 with Retry-After)
        └── PermanentDeliveryError   do not retry this recipient on this channel

Commands print ``str(error)`` as one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class MembercareError(Exception):
    """Base class of every error membercare raises deliberately."""


class ConfigurationError(MembercareError):
    """Settings or credentials are wrong or missing. Never swallowed and never retried."""


class InputError(MembercareError):
    """The user gave input we cannot act on."""


class UnknownNameError(InputError):
    def __init__(self, kind: str, name: str, choices: Iterable[str]):
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(self.choices) or '(none)'}")


class DataError(MembercareError):
    """Stored data breaks an invariant we rely on."""


class DeliveryError(MembercareError):
    """A provider did not accept a message."""


class TransientDeliveryError(DeliveryError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    def __init__(self, message: str, reason: str = "rejected"):
        super().__init__(message)
        self.reason = reason
