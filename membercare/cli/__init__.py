"""The ``membercare`` command line (Typer + Rich).

Each area registers its commands from its own module (``membercare.cli.<area>``); this module owns
the app, the global ``--debug`` flag and the rule that an error is one clear line on stderr.
Commands that need Prefect import it inside the command, so ``import membercare`` stays Prefect-free.
"""

from __future__ import annotations

import sys
import traceback

import typer

from membercare.cli.common import console, err_console, state
from membercare.errors import MembercareError

app = typer.Typer(
    name="membercare",
    help="Omnichannel member-care messaging for online shops: segments, templates, email/SMS/push "
    "delivery and engagement tracking, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state.debug = debug


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from membercare.cli import bench as _bench  # noqa: F401
    from membercare.cli import blocks as _blocks  # noqa: F401
    from membercare.cli import campaign as _campaign  # noqa: F401
    from membercare.cli import db as _db  # noqa: F401
    from membercare.cli import demo as _demo  # noqa: F401
    from membercare.cli import experiments as _experiments  # noqa: F401
    from membercare.cli import generate as _generate  # noqa: F401
    from membercare.cli import imports as _imports  # noqa: F401
    from membercare.cli import members as _members  # noqa: F401
    from membercare.cli import report as _report  # noqa: F401
    from membercare.cli import sandbox as _sandbox  # noqa: F401
    from membercare.cli import segments as _segments  # noqa: F401
    from membercare.cli import serve as _serve  # noqa: F401
    from membercare.cli import stack as _stack  # noqa: F401
    from membercare.cli import templates as _templates  # noqa: F401
    from membercare.cli import trigger as _trigger  # noqa: F401

_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning our errors into one line and exit code 1."""
    try:
        # standalone_mode=False returns a command's exit code (typer.Exit) instead of exiting.
        rc = app(args=argv, standalone_mode=False)
    except MembercareError as exc:
        _fail(str(exc), exc)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", exc)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - click's own usage errors are handled below
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        _fail(f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", exc)
    sys.exit(rc if isinstance(rc, int) else 0)


def _fail(message: str, exc: BaseException) -> None:
    if state.debug:
        traceback.print_exception(exc)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(1)


__all__ = ["app", "main", "console"]
