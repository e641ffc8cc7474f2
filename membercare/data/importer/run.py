"""The import itself (:func:`import_csv`): the file is streamed in batches, each applied in one transaction.

The steps and guarantees are described in :mod:`membercare.data.importer`. A database failure raises
:class:`ImportDatabaseError`, whose message never holds row values.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare import validation as v
from membercare.config import Settings
from membercare.data.importer.handler import INSERTED, UNCHANGED, UPDATED, Context, Handler, Unit
from membercare.data.importer.kinds import handler_for
from membercare.data.importer.reading import CsvSource, Row, check_encoding
from membercare.data.importer.report import SAMPLE_REJECTS, BatchResult, ImportReport, Reject, RejectsWriter
from membercare.errors import InputError, MembercareError
from membercare.models import ImportRun, Tier
from membercare.timeutil import utcnow

DEFAULT_BATCH_SIZE = 2_000


class _SeenKeys:
    """The file keys seen so far (for duplicate detection), kept in a private temporary SQLite file.

    A dict would grow by 100-200 bytes per key (a gigabyte for a ten-million-member export); an indexed
    scratch table on disk keeps memory flat at the cost of one indexed lookup and insert per batch.
    """

    _CHUNK = 900  # stays under SQLite's bound-parameter limit on every version

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="membercare-import-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "seen.db"), isolation_level=None)
        # Scratch data: no journal, no fsync; it is worthless after this process ends.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (k TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")

    @staticmethod
    def text(key: Hashable) -> str:
        parts = key if isinstance(key, tuple) else (key,)
        return "\x1f".join(p.isoformat() if isinstance(p, datetime) else str(p) for p in parts)

    def first_lines(self, keys: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(keys), self._CHUNK):
            chunk = keys[i : i + self._CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT k, line FROM seen WHERE k IN ({marks})", chunk).fetchall())
        return found

    def add(self, items: Iterable[tuple[str, int]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR IGNORE INTO seen (k, line) VALUES (?, ?)", items)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


def default_rejects_path(path: Path) -> Path:
    """``orders.csv`` -> ``orders.rejects.csv`` next to the input."""
    return path.with_name(f"{path.stem}.rejects.csv")


def import_csv(
    engine: Engine,
    kind: str,
    path: str | os.PathLike[str],
    *,
    settings: Settings | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rejects_path: str | os.PathLike[str] | None = None,
    allow_extra_columns: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_batch_committed: Callable[[BatchResult], None] | None = None,
    now: datetime | None = None,
) -> ImportReport:
    """Import one CSV file of ``kind`` (members, orders, coupons, devices, consents) into ``engine``'s database.

    ``progress(bytes_read, bytes_total)`` is called after each committed batch; ``on_batch_committed``
    receives each :class:`BatchResult` right after its commit (an exception raised there stops the import
    with everything up to that batch committed, which is how tests simulate a crash). ``now`` (default the
    clock) is what "in the future" is measured against and the time a product's ``restocked_at`` is set to.

    Raises :class:`~membercare.errors.InputError` for problems with the file as a whole (missing, empty,
    not UTF-8, missing or unknown columns), always before anything is written; bad rows (including
    broken quoting, control characters and bytes that are not UTF-8 in a row) are reported, not raised.
    A database failure raises :class:`ImportDatabaseError`, whose message never holds row values.
    """
    handler = handler_for(kind)
    settings = settings or Settings.from_env()
    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    started = time.monotonic()
    source = CsvSource(path, handler, allow_extra_columns=allow_extra_columns)
    report: ImportReport | None = None
    try:
        check_encoding(path)
        rejects = RejectsWriter(Path(rejects_path) if rejects_path else default_rejects_path(path), source.header)
        ctx = Context(settings=settings, present=source.present, now=now or utcnow(), **_load_tiers(engine))
        report = _start_run(engine, handler.kind, _source_name(path))
        try:
            _run(engine, handler, source, ctx, report, rejects, batch_size, progress, on_batch_committed)
        except BaseException as exc:
            rejects.discard()
            _finish_run(engine, report.run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        report.rejects_path = rejects.finish()
        _finish_run(engine, report.run_id, "completed")
        report.elapsed_s = time.monotonic() - started
        return report
    except sa.exc.SQLAlchemyError as exc:
        # str(exc) carries the statement, its bound parameters and the server's detail text (which can
        # quote the row): none of it is repeated. `from None`: not in a --debug traceback either.
        raise ImportDatabaseError(_database_failure(path, report, exc)) from None
    finally:
        source.close()


class ImportDatabaseError(MembercareError):
    """The database failed during an import (not the file's fault). The message holds no row values."""


def describe_db_error(exc: BaseException) -> str:
    """``IntegrityError, SQLSTATE 23505, constraint uq_x``: what a database error was, without its text.

    The text of a database error quotes the statement's parameters and, on PostgreSQL, often the row
    (``DETAIL: Key (email)=(...)``, ``Failing row contains (...)``). Only the class, the SQLSTATE and
    the names of the table, column and constraint involved are kept.
    """
    orig = getattr(exc, "orig", None) or exc
    parts = [type(exc).__name__]  # SQLAlchemy's class (IntegrityError, DataError, ...) is the same on every database
    if type(orig).__name__ != parts[0]:
        parts.append(type(orig).__name__)  # the driver's: CheckViolation, StringDataRightTruncation, ...
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    if sqlstate:
        parts.append(f"SQLSTATE {sqlstate}")
    diag = getattr(orig, "diag", None)
    for label, attr in (("table", "table_name"), ("column", "column_name"), ("constraint", "constraint_name")):
        name = getattr(diag, attr, None) if diag is not None else None
        if name:
            parts.append(f"{label} {name}")
    errorname = getattr(orig, "sqlite_errorname", None)  # sqlite3: SQLITE_CONSTRAINT_UNIQUE, SQLITE_BUSY, ...
    if errorname:
        parts.append(errorname)
    return ", ".join(parts)


def _database_failure(path: Path, report: ImportReport | None, exc: BaseException) -> str:
    what = describe_db_error(exc)
    if report is None or not report.batches:
        return f"{path.name}: the database failed before any row was imported ({what})"
    return (f"{path.name}: the database failed during the import ({what}); {report.rows_total:,} rows up to "
            f"batch {report.batches} had been committed (import run #{report.run_id} is marked failed). "
            "Run the same command again to import the rest: rows already imported count as unchanged")


def _run(engine: Engine, handler: Handler, source: CsvSource, ctx: Context, report: ImportReport,
         rejects: RejectsWriter, batch_size: int, progress, on_batch_committed) -> None:
    seen = _SeenKeys()
    try:
        _run_batches(engine, handler, source, ctx, report, rejects, batch_size, progress, on_batch_committed, seen)
    finally:
        seen.close()


def _run_batches(engine: Engine, handler: Handler, source: CsvSource, ctx: Context, report: ImportReport,
                 rejects: RejectsWriter, batch_size: int, progress, on_batch_committed, seen: _SeenKeys) -> None:
    batch: list[Unit] = []
    rows_in_batch = 0
    for unit in _units(source.rows(), handler):
        batch.append(unit)
        rows_in_batch += len(unit.rows)
        if rows_in_batch >= batch_size:
            _process_batch(engine, handler, batch, ctx, seen, report, rejects, source, on_batch_committed)
            batch, rows_in_batch = [], 0
            if progress:
                progress(source.bytes_read, source.size)
    if batch:
        _process_batch(engine, handler, batch, ctx, seen, report, rejects, source, on_batch_committed)
    if progress:
        progress(source.size, source.size)


def _units(rows: Iterator[Row], handler: Handler) -> Iterator[Unit]:
    if not handler.groups_lines:
        for row in rows:
            yield Unit([row])
        return
    group: list[Row] = []
    for row in rows:
        if group and row.values.get(handler.key_column, "") != group[0].values.get(handler.key_column, ""):
            yield Unit(group)
            group = []
        group.append(row)
    if group:
        yield Unit(group)


def _clean_key(key: Hashable | None) -> Hashable | None:
    """``None`` for a key holding control characters or bytes that were not UTF-8.

    Its row is rejected for them anyway, and such a key is no key: it is not kept in the scratch file
    of keys seen (which, like any SQLite text, cannot hold bytes that are not UTF-8).
    """
    parts = key if isinstance(key, tuple) else (key,)
    if any(isinstance(p, str) and v.has_suspect_characters(p) for p in parts):
        return None
    return key


def _commit_batch(engine: Engine, handler: Handler, units: list[Unit], valid: list[Unit], ctx: Context,
                  report: ImportReport, *, one_by_one: bool) -> tuple[dict[str, int], int, int]:
    """Write a batch's valid units and advance the run's counters in one transaction.

    ``one_by_one`` writes each unit in its own savepoint and rejects the units the database refuses
    (the reason names the error class and SQLSTATE, never the values).
    """
    counts = {INSERTED: 0, UPDATED: 0, UNCHANGED: 0}
    with engine.begin() as conn:
        if one_by_one:
            for u in valid:
                if u.rejects:  # rejected by the first attempt for a reason of its own (e.g. an unknown member)
                    continue
                u.outcome = None
                try:
                    with conn.begin_nested():
                        handler.write(conn, [u], ctx)
                except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
                    u.outcome = None
                    u.reject_all(f"the database refused this row ({describe_db_error(exc)})")
        elif valid:
            handler.write(conn, valid, ctx)
        n_rows = sum(len(u.rows) for u in units)
        n_rejected = 0
        for u in units:
            if u.rejects:
                n_rejected += len(u.rows)
            else:
                counts[u.outcome] += len(u.rows)  # type: ignore[index]
        runs = ImportRun.__table__
        conn.execute(
            runs.update()
            .where(runs.c.id == report.run_id)
            .values(
                rows_total=runs.c.rows_total + n_rows,
                rows_inserted=runs.c.rows_inserted + counts[INSERTED],
                rows_updated=runs.c.rows_updated + counts[UPDATED],
                rows_unchanged=runs.c.rows_unchanged + counts[UNCHANGED],
                rows_rejected=runs.c.rows_rejected + n_rejected,
            )
        )
    return counts, n_rows, n_rejected


def _process_batch(engine: Engine, handler: Handler, units: list[Unit], ctx: Context, seen: _SeenKeys,
                   report: ImportReport, rejects: RejectsWriter, source: CsvSource, on_batch_committed) -> None:
    keys = [_clean_key(handler.file_key(u.rows[0])) for u in units]
    texts = [None if k is None else seen.text(k) for k in keys]
    first_seen = seen.first_lines(sorted({t for t in texts if t is not None}))
    new_keys: dict[str, int] = {}
    valid: list[Unit] = []
    for u, key, text in zip(units, keys, texts, strict=True):
        if text is not None:
            first = first_seen.get(text) or new_keys.get(text)
            if first is not None:
                u.reject_all(handler.describe_duplicate(key, first))
                continue
            new_keys[text] = u.first_line
        structural = next((r for r in u.rows if r.error), None)
        if structural is not None and not handler.groups_lines:
            u.reject_all(structural.error or "")
            continue
        try:
            u.parsed = handler.parse(u, ctx)
        except v.ValidationError as exc:
            u.reject_all(str(exc))
            continue
        if u.parsed is not None and not u.rejects:
            valid.append(u)

    seen.add(new_keys.items())

    try:
        counts, n_rows, n_rejected = _commit_batch(engine, handler, units, valid, ctx, report, one_by_one=False)
    except (sa.exc.DataError, sa.exc.IntegrityError):
        if not valid:
            raise
        # The database refused a value that validation let through. The batch was rolled back; apply it
        # again one unit at a time so that only the refused rows are rejected.
        counts, n_rows, n_rejected = _commit_batch(engine, handler, units, valid, ctx, report, one_by_one=True)
    # Committed: only now do the batch's rejects reach the report, so a crash never reports a batch twice.
    for u in units:
        for row in u.rows:
            reason = u.rejects.get(row.line)
            if reason is not None:
                rejects.write(row, reason)
                if len(report.sample_rejects) < SAMPLE_REJECTS:
                    report.sample_rejects.append(Reject(row.line, reason))
    rejects.flush()
    report.batches += 1
    report.rows_total += n_rows
    report.inserted += counts[INSERTED]
    report.updated += counts[UPDATED]
    report.unchanged += counts[UNCHANGED]
    report.rejected += n_rejected
    if on_batch_committed:
        on_batch_committed(BatchResult(report.batches, n_rows, counts[INSERTED], counts[UPDATED], counts[UNCHANGED],
                                       n_rejected, source.bytes_read))


def _load_tiers(engine: Engine) -> dict[str, Any]:
    t = Tier.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.code, t.c.rank).order_by(t.c.rank)).all()
    if not rows:
        raise InputError("the tiers table is empty; run `membercare db upgrade` (it seeds the default tiers)")
    return {"tiers": {r.code: r.rank for r in rows}, "entry_tier": rows[0].code}


def _source_name(path: Path) -> str:
    name = str(path.resolve())
    return name if len(name) <= 500 else "..." + name[-497:]


def _start_run(engine: Engine, kind: str, source_name: str) -> ImportReport:
    runs = ImportRun.__table__
    with engine.begin() as conn:
        # A run of the same file still marked "running" was killed (or is running right now, in which case
        # both finish correctly since every write is an idempotent upsert): this run supersedes it.
        stale = conn.execute(
            sa.select(runs.c.id).where(runs.c.kind == kind, runs.c.source_name == source_name,
                                       runs.c.status == "running")
        ).scalars().all()
        if stale:
            conn.execute(runs.update().where(runs.c.id.in_(stale)).values(status="superseded", finished_at=utcnow()))
        run_id = conn.execute(
            runs.insert().values(kind=kind, source_name=source_name, started_at=utcnow(), status="running")
            .returning(runs.c.id)
        ).scalar_one()
    return ImportReport(run_id=run_id, kind=kind, source=source_name, superseded_runs=list(stale))


def _finish_run(engine: Engine, run_id: int, status: str) -> None:
    runs = ImportRun.__table__
    try:
        with engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(status=status, finished_at=utcnow()))
    except Exception:
        if status == "completed":
            raise
        # Recording a failure must not mask the error that caused it.
