"""The membercare exception tree: every exception membercare raises, and nothing else.

::

    MembercareError                  errors                     base of everything membercare raises on purpose
    ├── ConfigurationError           errors                     settings/credentials wrong; never swallowed or retried
    │   ├── TemplateCheckError       rendering.check            a campaign's templates fail the pre-flight check
    │   └── ConfigError              sandbox.config             a sandbox setting out of range; also a ValueError
    ├── InputError                   errors                     input we cannot act on (arguments, files, requests)
    │   ├── UnknownNameError         errors                     an unknown segment, campaign, ... (names the choices)
    │   ├── ValidationError          validation                 a value from outside that we refuse; also a ValueError
    │   ├── MalformedPayload         engagement.events          a body not of the documented shape; also a ValueError
    │   ├── WebhookRejected          channels.base              a provider webhook request refused, with its HTTP status
    │   ├── CampaignDefinitionError  campaigns.definition       a campaign.yaml that does not parse or validate
    │   ├── JourneyDefinitionError   journeys.definition        a journey.yaml that does not parse or validate
    │   ├── InvalidTokenError        links                      a link token malformed or signed by none of our keys
    │   └── RunPaused                delivery.dispatch_types    the run is paused; resume it (via delivery.dispatcher)
    ├── DataError                    errors                     stored data breaks an invariant we rely on
    │   └── RenderFailed             campaigns.plan             a member's message cannot be rendered while planning
    ├── RenderError                  errors                     a template error, a missing variant, a channel limit
    │   ├── ContentLimitError        rendering.engine           rendered content over a channel limit
    │   ├── TemplateLimitError       rendering.limits           a template over a render bound; also a SecurityError
    │   └── InlineError              rendering.htmltext         CSS inlining would move Jinja syntax; also a ValueError
    ├── DeliveryError                errors                     sending or settling could not complete (see below)
    │   ├── DispatchProcessError     delivery.pool              a dispatcher process died; also a RuntimeError
    │   └── ProviderLookupError      delivery.provider_records  records not read completely; also a RuntimeError
    ├── ImportDatabaseError          data.importer.run          the database failed during an import
    └── TemplateCheckFailed          cli.templates              ``membercare templates check`` found errors

Columns: the class, its module (``membercare.`` left out), what it means. "also a ValueError" marks a
class that keeps another base (built-in, or Jinja's ``SecurityError``) so that callers catching that one
still work. A provider's verdict on one message is not an exception: adapters *return* ``Accepted``,
``TransientFailure`` or ``PermanentFailure`` (:mod:`membercare.delivery.contract`); only a configuration
problem is raised (``ConfigurationError``).

Private exceptions carry control flow inside one module and are caught there; they never escape it:
``data.importer.reading._RecordTooLong``, ``receiver.app._Reject``, ``receiver.app._BodyRefused``.

``tests/test_errors.py`` checks that this drawing is exactly the set of exception classes defined in
``membercare/``, ``channels/`` and ``segments/``, with these parents, and that each is raised somewhere.
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


class RenderError(MembercareError):
    """A message could not be rendered (template error, missing variant, over a channel limit).

    Defined here rather than in :mod:`membercare.rendering.engine` (which re-exports it) so that the modules
    engine builds on, such as :mod:`membercare.rendering.htmltext`, can derive from it without a cycle.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, code: str = "render"):
        super().__init__(f"{file}:{line}: {message}" if file and line else f"{file}: {message}" if file else message)
        self.detail, self.file, self.line, self.code = message, file, line, code


class DeliveryError(MembercareError):
    """Sending or settling messages could not complete (a process died, a provider's records could not be read).

    Not raised for one message a provider refused: adapters return that as a result.
    """
