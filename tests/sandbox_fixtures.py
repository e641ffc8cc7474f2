"""Fixtures for tests that talk to the provider sandbox through the real SDKs.

Import them into a test module with ``from sandbox_fixtures import *`` (or move them into conftest.py).

* ``sandbox_server``: one in-process sandbox per test session on a free loopback port.
* ``sandbox``: the same server, reset (records, counters and configuration) before each test.
* ``service_account``: a locally generated RSA service-account key file whose ``token_uri`` points at the
  sandbox, so firebase-admin runs the real OAuth JWT-bearer flow; its public key is registered with the
  sandbox so the assertion signature is verified too.
* ``channel_env``: the MEMBERCARE_* variables that point all three adapters at the sandbox.
* ``adapters``: the three adapters built from ``channel_env``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from membercare.sandbox import SandboxConfig, SandboxServer

SENDGRID_KEY = "SG.sandbox-test-key"
TWILIO_SID = "AC" + "0" * 31 + "1"
TWILIO_TOKEN = "twilio-test-auth-token"
TWILIO_FROM = "+886223456789"
FCM_PROJECT = "membercare-test"
SA_EMAIL = f"push-sender@{FCM_PROJECT}.iam.gserviceaccount.com"
PUBLIC_URL = "http://127.0.0.1:9"  # status-callback base; tests that need callbacks set their own


def make_service_account(directory: Path, token_uri: str) -> tuple[Path, str]:
    """Write a service-account JSON with a fresh RSA key; returns (path, public key PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    info = {
        "type": "service_account",
        "project_id": FCM_PROJECT,
        "private_key_id": "sandbox-key-1",
        "private_key": private_pem,
        "client_email": SA_EMAIL,
        "client_id": "1234567890",
        "auth_uri": token_uri.rsplit("/", 1)[0] + "/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "",
        "client_x509_cert_url": "",
        "universe_domain": "googleapis.com",
    }
    path = directory / "service-account.json"
    path.write_text(json.dumps(info), encoding="utf-8")
    return path, public_pem


def base_config(public_pem: str | None = None) -> SandboxConfig:
    return SandboxConfig(
        seed=11,
        sendgrid_api_keys=[SENDGRID_KEY],
        twilio_accounts={TWILIO_SID: TWILIO_TOKEN},
        fcm_service_accounts={SA_EMAIL: public_pem} if public_pem else {},
        fcm_require_known_service_account=bool(public_pem),
        timeout_hold_s=3.0,
    )


@pytest.fixture(scope="session")
def sandbox_sa_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service-account")


@pytest.fixture(scope="session")
def sandbox_server(sandbox_sa_dir):
    server = SandboxServer(base_config()).start()
    path, public_pem = make_service_account(sandbox_sa_dir, server.token_uri)
    server.app.initial_config = base_config(public_pem)
    server.reset(config=True)
    server.service_account_path = path  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server) -> SandboxServer:
    sandbox_server.reset(config=True)
    return sandbox_server


@pytest.fixture
def service_account(sandbox_server) -> Path:
    return sandbox_server.service_account_path  # type: ignore[attr-defined]


def env_for(sandbox: SandboxServer, service_account: Path) -> dict[str, str]:
    return {
        "MEMBERCARE_SENDGRID_API_KEY": SENDGRID_KEY,
        "MEMBERCARE_SENDGRID_FROM": "Sandbox Shop <shop@example.com>",
        "MEMBERCARE_SENDGRID_BASE_URL": sandbox.url,
        "MEMBERCARE_TWILIO_ACCOUNT_SID": TWILIO_SID,
        "MEMBERCARE_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "MEMBERCARE_TWILIO_FROM": TWILIO_FROM,
        "MEMBERCARE_TWILIO_BASE_URL": sandbox.url,
        "MEMBERCARE_PUBLIC_URL": PUBLIC_URL,
        "MEMBERCARE_FIREBASE_CREDENTIALS": str(service_account),
        "MEMBERCARE_FCM_BASE_URL": sandbox.url,
    }


@pytest.fixture
def channel_env(sandbox, service_account) -> dict[str, str]:
    return env_for(sandbox, service_account)


@pytest.fixture(scope="session")
def sandbox_adapters(sandbox_server):
    """The three adapters, built once per session (they hold no per-test state)."""
    from channels.registry import build_channels, close_channels

    built = build_channels(env_for(sandbox_server, sandbox_server.service_account_path))
    yield built
    close_channels(built)


@pytest.fixture
def adapters(sandbox, sandbox_adapters):
    """All three adapters pointed at a freshly reset sandbox."""
    return sandbox_adapters
