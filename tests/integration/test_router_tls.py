"""The router reaches the controller over mTLS when its `controller_tls_*` keys are set: a real router
process against a controller admin server that requires client certificates (the fake of
test_dctl_cluster.py) opens its routing-table stream; a bad certificate path stops it at start-up with one
line naming the key."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import _missing
from tests.integration.test_dctl_cluster import FakeAdmin, _ServerThread
from tests.integration.tls_pki import Pki, make_pki, openssl_available
from tests.system.stack import ROOT, clean_env, kill

TOKEN = "router-token-0123456789"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    if not openssl_available():
        _missing("the openssl command is not installed")
    return make_pki(tmp_path / "pki")


@pytest.fixture
def controller(pki: Pki) -> Iterator[_ServerThread]:
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.cert.read_bytes(),
        require_client_auth=True,
    )
    running = _ServerThread(FakeAdmin(token=TOKEN), credentials)
    yield running
    running.close()


def _env(pki: Pki, controller: str, token_file: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        {
            "DYNAMOLLM_ROUTER_CONTROLLER": controller,
            "DYNAMOLLM_ROUTER_CONTROLLER_TOKEN_FILE": str(token_file),
            "DYNAMOLLM_ROUTER_CONTROLLER_TLS_CA": str(pki.ca.cert),
            "DYNAMOLLM_ROUTER_CONTROLLER_TLS_CERT": str(pki.client.cert),
            "DYNAMOLLM_ROUTER_CONTROLLER_TLS_KEY": str(pki.client.key),
            **extra,
        }
    )


async def _router(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with open(log, "wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.router.app", "--listen", "127.0.0.1:0",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip


async def test_the_router_watches_routes_over_mtls_with_its_token(
    pki: Pki, controller: _ServerThread, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = await _router(_env(pki, controller.addr, token_file), tmp_path / "router.log")
    try:
        deadline = time.monotonic() + 20
        while not controller.fake.requests("WatchEvents"):
            assert time.monotonic() < deadline, (tmp_path / "router.log").read_text()
            await asyncio.sleep(0.1)
        (_, request, metadata) = next(c for c in controller.fake.calls if c[0] == "WatchEvents")
        assert list(request.kinds) == ["routes"] and metadata["authorization"] == f"Bearer {TOKEN}"
    finally:
        await kill(proc)


async def test_a_missing_certificate_file_stops_start_up_naming_the_key(
    pki: Pki, controller: _ServerThread, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = _env(
        pki, controller.addr, token_file, DYNAMOLLM_ROUTER_CONTROLLER_TLS_CERT=str(tmp_path / "absent")
    )
    proc = await _router(env, tmp_path / "router.log")
    assert await asyncio.wait_for(proc.wait(), 20) == 2
    lines = (tmp_path / "router.log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynamollm-router: error: controller_tls_cert: "), lines
    assert controller.fake.calls == []
