"""LINE in operations: its credentials go to Prefect Secret blocks (never prefect.yaml), and the dry run
warns when a campaign's LINE messages would pass the month's remaining quota."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_fixtures import *  # noqa: F403 - the sandbox fixtures

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


def test_the_dry_run_warns_when_its_line_messages_would_pass_the_remaining_quota(sandbox):
    import logging

    import httpx

    from channels.line.adapter import LineChannel, LineConfig
    from flows.campaign import with_line_quota
    from membercare.campaigns.dry_run import DryRunReport
    from membercare.delivery.contract import LineContent, OutboundMessage
    from membercare.models import Channel, Purpose

    token = "line-ops-access-token"
    sandbox.configure(line_access_tokens=[token], line_quota=10)
    env = {"MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN": token, "MEMBERCARE_LINE_BASE_URL": sandbox.url}
    line = LineChannel(LineConfig(channel_access_token=token, base_url=sandbox.url))
    try:
        for i in range(4):  # four pushes of text + Flex: LINE counts four messages, not eight
            flex = '{"type":"bubble","body":{"type":"box","layout":"vertical","contents":[]}}'
            line.send(OutboundMessage(message_id=f"m{i}", idempotency_key=f"ops:{i}", channel=Channel.LINE,
                                      purpose=Purpose.MARKETING, to="U" + f"{i:032x}",
                                      content=LineContent(text="hi", flex_json=flex, alt_text="hi")))
        assert (line.quota().used, line.quota().remaining) == (4, 6)
    finally:
        line.close()
    log = logging.getLogger("test.line.quota")

    def report(now: int, later: int) -> DryRunReport:
        return DryRunReport("winback", "2026-12", 100, 100, would_send={"email": 50, "line": now},
                            deferred={"line": later} if later else {})

    fits = with_line_quota(report(5, 1), env, log).line_quota
    assert fits is not None and not fits.exceeded
    assert fits.line() == "LINE quota: 6 of the 6 messages left this month"
    over = with_line_quota(report(6, 1), env, log).line_quota
    assert over is not None and over.exceeded and (over.wanted, over.remaining, over.limit) == (7, 6, 10)
    assert over.line().startswith("WARNING LINE quota: 7 LINE messages would be sent but only 6 of 10")
    lookups = httpx.get(f"{sandbox.url}/sandbox/stats").json()["lookups"].get("line", 0)
    assert with_line_quota(report(0, 0), env, log).line_quota is None  # nothing on LINE: the quota is not read
    assert httpx.get(f"{sandbox.url}/sandbox/stats").json()["lookups"].get("line", 0) == lookups
    unread = with_line_quota(report(3, 0), {}, log).line_quota
    assert unread is not None and unread.error == "ConfigurationError" and not unread.exceeded
    sandbox.configure(line_quota=None)
    unlimited = with_line_quota(report(3, 0), env, log).line_quota
    assert unlimited.line() == "LINE quota: no monthly limit set (4 messages sent this month)"
