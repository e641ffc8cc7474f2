"""The ``membercare`` command line (Typer + Rich).

Each area registers its commands from its own module (``membercare.cli.<area>``); this module owns
the app, the global ``--debug`` flag and the rule that an error is one clear line on stderr.
Commands that need Prefect import it inside the command, so ``import membercare`` stays Prefect-free.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup

from membercare.cli.common import console, err_console, state
from membercare.cli.project import PREFECT_TIMEOUT_MESSAGE, apply_project_config
from membercare.errors import MembercareError


class _LazyGroup(TyperGroup):
    """A command group whose module is imported only when the group is used, not for ``membercare --help``.

    ``make_context`` hands over to the real group (Typer invokes ``sub_ctx.command``), so parsing, help
    and errors are the real group's own.
    """

    def __init__(self, name: str, module: str, attribute: str, help: str):
        super().__init__(name=name, help=help)
        self._module, self._attribute = module, attribute

    def real(self) -> Any:
        import importlib

        group = typer.main.get_group(getattr(importlib.import_module(self._module), self._attribute))
        group.name = self.name
        return group

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return self.real().make_context(info_name, args, parent=parent, **extra)


# Groups whose modules are slow to import (``import`` loads the importer and the models: about a second),
# loaded on first use so that ``membercare --help`` stays under a second.
LAZY_GROUPS: dict[str, tuple[str, str, str]] = {
    "import": ("membercare.cli.imports", "import_app",
               "Import shop data from CSV (layouts: docs/import-formats.md). Re-importing a file changes nothing; "
               "bad rows are rejected with line and reason while every good row is imported."),
}


class _Root(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return names + [n for n in LAZY_GROUPS if n not in names]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and cmd_name in LAZY_GROUPS:
            cmd = _LazyGroup(cmd_name, *LAZY_GROUPS[cmd_name])
        return cmd


app = typer.Typer(
    name="membercare",
    cls=_Root,
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
    from membercare.cli import churn as _churn  # noqa: F401
    from membercare.cli import controls as _controls  # noqa: F401
    from membercare.cli import db as _db  # noqa: F401
    from membercare.cli import demo as _demo  # noqa: F401
    from membercare.cli import experiments as _experiments  # noqa: F401
    from membercare.cli import generate as _generate  # noqa: F401
    from membercare.cli import journeys as _journeys  # noqa: F401
    from membercare.cli import members as _members  # noqa: F401
    from membercare.cli import optimise as _optimise  # noqa: F401
    from membercare.cli import report as _report  # noqa: F401
    from membercare.cli import sandbox as _sandbox  # noqa: F401
    from membercare.cli import segments as _segments  # noqa: F401
    from membercare.cli import serve as _serve  # noqa: F401
    from membercare.cli import stack as _stack  # noqa: F401
    from membercare.cli import templates as _templates  # noqa: F401
    from membercare.cli import trigger as _trigger  # noqa: F401
    from membercare.cli import ui as _ui  # noqa: F401

_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning our errors into one line and exit code 1."""
    try:
        # Before any command runs (and so before Prefect is imported): the project's .membercare/config.toml.
        apply_project_config()
        state.reset()
        # standalone_mode=False returns a command's exit code (typer.Exit) instead of exiting.
        rc = app(args=argv, standalone_mode=False)
    except MembercareError as exc:
        _fail(str(exc), exc)
    except RuntimeError as exc:
        if PREFECT_TIMEOUT_MESSAGE not in str(exc):
            _fail(f"unexpected error: RuntimeError: {exc} (run with --debug for the traceback)", exc)
        wait = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "?")
        _fail(f"Prefect's temporary local server did not answer within {wait} s (the machine may be busy). Raise "
              "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server once with `membercare ui` "
              "and set PREFECT_API_URL to the address it prints", exc)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", exc)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - click's own usage errors are handled below
        import click

        # Typer bundles its own copy of click: its usage errors (typer.BadParameter, ...) are not
        # click.ClickException, so both families are recognised here.
        bundled = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
        if isinstance(exc, (click.exceptions.ClickException, bundled)):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, (click.exceptions.Abort, typer.Abort)):
            sys.exit(1)
        _fail(f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", exc)
    sys.exit(rc if isinstance(rc, int) else 0)


def _fail(message: str, exc: BaseException) -> None:
    if state.debug:
        traceback.print_exception(exc)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(1)


__all__ = ["app", "main", "console"]
