"""LINE in operations: its credentials go to Prefect Secret blocks (never prefect.yaml), and the dry run
warns when a campaign's LINE messages would pass the month's remaining quota."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCESS_TOKEN = "line-access-token-value-never-printed"
CHANNEL_SECRET = "0123456789abcdef0123456789abcdef"


def test_setup_blocks_stores_the_line_credentials_as_secret_blocks_without_printing_them(monkeypatch, capsys):
    import membercare.cli as cli
    import membercare.cli.blocks  # noqa: F401
    from flows.common import SECRET_VARIABLES, block_name
    from membercare.cli.common import console

    monkeypatch.setattr(console, "width", 200)  # block names whole, not cut to the terminal

    assert {"MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN", "MEMBERCARE_LINE_CHANNEL_SECRET"} <= set(SECRET_VARIABLES)
    for var in SECRET_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MEMBERCARE_FIREBASE_CREDENTIALS", raising=False)
    monkeypatch.setenv("MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN", ACCESS_TOKEN)
    monkeypatch.setenv("MEMBERCARE_LINE_CHANNEL_SECRET", CHANNEL_SECRET)
    with pytest.raises(SystemExit) as done:
        cli.main(["setup-blocks", "--dry-run", "--no-limits"])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert block_name("MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN") == "membercare-line-channel-access-token"
    assert "membercare-line-channel-access-token" in out and "membercare-line-channel-secret" in out
    assert ACCESS_TOKEN not in out and CHANNEL_SECRET not in out


def test_no_line_credential_is_in_prefect_yaml_or_the_deploy_files():
    texts = [ROOT / "prefect.yaml", *sorted((ROOT / "deploy").rglob("*")), *sorted((ROOT / "run").rglob("*"))]
    for path in texts:
        if path.is_file() and path.suffix in (".yaml", ".yml", ".toml", ".env", ".json", ""):
            text = path.read_text(encoding="utf-8", errors="replace")
            for var in ("MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN", "MEMBERCARE_LINE_CHANNEL_SECRET"):
                for line in text.splitlines():
                    if var in line and "=" in line:
                        value = line.split("=", 1)[1].strip().strip("\"'")
                        assert not value or value.startswith(("$", "<", "...")), f"{path}: {var} has a value"
