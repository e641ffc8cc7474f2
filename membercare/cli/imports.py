"""``membercare import members|orders|coupons|devices|consents FILE``: CSV import with a rejects report.

Exit codes: 0 every row imported (or already present), 3 the import finished but some rows were
rejected (see the rejects file), 1 the file as a whole could not be imported (missing, not UTF-8,
wrong columns, database error).

Nothing printed here repeats a row's values: reasons are PII-free by construction (membercare.validation),
and an unexpected error is named by its type only (its text could quote a row; ``--debug`` shows it).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, err_console, migrated_engine, state
from membercare.data.importer import DEFAULT_BATCH_SIZE, KINDS, ImportReport, columns_for, import_csv
from membercare.errors import MembercareError

EXIT_REJECTS = 3

import_app = typer.Typer(
    help="Import shop data from CSV (layouts: docs/import-formats.md). Re-importing a file changes nothing; "
    "bad rows are rejected with line and reason while every good row is imported.",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")


def _run_import(kind: str, file: Path, batch_size: int, rejects: Path | None, allow_extra_columns: bool) -> None:
    engine = migrated_engine()
    size = file.stat().st_size if file.is_file() else 0
    with Progress(
        TextColumn(f"[bold]{kind}[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(kind, total=size or None)
        try:
            report = import_csv(
                engine, kind, file,
                settings=state.settings,
                batch_size=batch_size,
                rejects_path=rejects,
                allow_extra_columns=allow_extra_columns,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except MembercareError:
            raise
        except Exception as exc:
            # Not a bad row (those are rejected) but a fault: its text can quote the row being processed.
            raise MembercareError(f"{file.name}: unexpected {type(exc).__name__} during the import "
                                  "(run with --debug for the traceback)") from exc
    _print_report(report)
    if report.rejected:
        raise SystemExit(EXIT_REJECTS)  # SystemExit: the app's main() turns a returned code into 0


def _print_report(r: ImportReport) -> None:
    for run in r.superseded_runs:
        console.print(f"[yellow]note:[/] import run #{run} of this file had not finished (killed?); "
                      "this run re-applied the whole file, rows it had committed count as unchanged")
    t = Table(title=f"import {r.kind}: {escape(Path(r.source).name)} (run #{r.run_id})", show_header=True)
    for col in ("rows", "inserted", "updated", "unchanged", "rejected", "batches", "seconds"):
        t.add_column(col, justify="right")
    t.add_row(f"{r.rows_total:,}", f"[green]{r.inserted:,}[/]", f"{r.updated:,}", f"{r.unchanged:,}",
              f"[red]{r.rejected:,}[/]" if r.rejected else "0", f"{r.batches:,}", f"{r.elapsed_s:.1f}")
    console.print(t)
    if r.rejected:
        rt = Table(title=f"first rejects (all {r.rejected:,} in {escape(str(r.rejects_path))})")
        rt.add_column("line", justify="right")
        rt.add_column("reason")
        for rej in r.sample_rejects:
            rt.add_row(str(rej.line), escape(rej.reason))  # a reason may repeat "[...]" from a cell
        console.print(rt)


def _help(kind: str) -> str:
    required, optional = columns_for(kind)
    return (f"Import {kind} from a CSV file. Required columns: {', '.join(required)}. "
            f"Optional: {', '.join(optional)}.")


_FILE = typer.Argument(..., help="The CSV file (UTF-8, header row first).", show_default=False)
_BATCH = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Rows per transaction.")
_REJECTS = typer.Option(None, "--rejects", help="Where to write rejected rows (default: FILE.rejects.csv next to "
                        "the input).", show_default=False)
_EXTRA = typer.Option(False, "--allow-extra-columns", help="Ignore columns the layout does not know (default: "
                      "refuse the file, a misspelt column would otherwise be silently dropped).")


def _register(kind: str) -> None:
    def command(file: Path = _FILE, batch_size: int = _BATCH, rejects: Path | None = _REJECTS,
                allow_extra_columns: bool = _EXTRA) -> None:
        _run_import(kind, file, batch_size, rejects, allow_extra_columns)

    # "import" is a keyword: the Python names are import_<kind>, the command names are the kinds.
    command.__name__ = f"import_{kind}"
    command.__doc__ = _help(kind)
    import_app.command(kind)(command)


for _kind in KINDS:
    _register(_kind)
