"""The command line: help lists every command, errors are one clear line, db upgrade is idempotent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    e.update({"MEMBERCARE_HOME": str(home), "COLUMNS": "200"}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "membercare.cli.__main__", *args], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=120)


def test_help_lists_every_command_with_a_description(tmp_path):
    from membercare.cli import app

    out = run_cli("--help", home=tmp_path)
    assert out.returncode == 0, out.stderr
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert {"db", "members", "demo"} <= names
    for name in names:
        line = next((ln for ln in out.stdout.splitlines() if f" {name} " in ln), None)
        assert line is not None, f"{name} missing from --help"
        assert len(line.split(name, 1)[1].strip(" │")) > 10, f"{name} has no helpful description"


@pytest.mark.slow  # several CLI processes, each importing the application
def test_db_upgrade_creates_then_is_idempotent(tmp_path):
    first = run_cli("db", "upgrade", home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "upgraded from empty" in first.stdout
    assert (tmp_path / "membercare.db").exists()
    second = run_cli("db", "upgrade", home=tmp_path)
    assert "already at revision" in second.stdout
    status = run_cli("db", "status", home=tmp_path)
    assert "up to date" in status.stdout


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    out = run_cli("members", "show", "nobody", home=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: no member with id 'nobody'"]
    dbg = run_cli("--debug", "members", "show", "nobody", home=tmp_path)
    assert "Traceback" in dbg.stderr and dbg.returncode == 1


def test_bad_database_url_is_one_clear_line(tmp_path):
    out = run_cli("db", "status", home=tmp_path, env={"MEMBERCARE_DATABASE_URL": "nosuchdriver://x"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_the_cli_imports_no_heavy_module_until_a_command_needs_it():
    """``membercare --help`` answers in well under a second because registering the commands imports no
    database, model, template or orchestration library (measured on the 2-core dev machine: 0.4 s CPU, was 1.3 s)."""
    code = ("import sys, membercare.cli\n"
            "print(sorted(m for m in ('sqlalchemy', 'sqlmodel', 'pydantic', 'prefect', 'jinja2', 'asyncio',"
            " 'membercare.models', 'membercare.db', 'membercare.data.importer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.strip() == "[]"
