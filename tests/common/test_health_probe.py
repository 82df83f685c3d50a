from __future__ import annotations

import asyncio
import socket

import pytest

from services.common.grpc_channel import PLAINTEXT
from services.common.grpc_server import start_server
from services.common.health_probe import is_serving, main, probe_security
from services.common.server_settings import ServerSettings
from tests.common.tls_files import Pki


def test_the_probe_passes_mtls_with_the_services_own_files_where_plaintext_fails(pki: Pki) -> None:
    settings = ServerSettings(
        transport_security="mtls",
        auth_mode="open",
        metrics_port=-1,
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.server.key_file,
        tls_ca_file=pki.ca_file,
    )

    async def probe() -> tuple[bool, bool]:
        running = await start_server(settings, [])
        try:
            target = f"127.0.0.1:{running.port}"
            return await is_serving(target, probe_security(settings)), await is_serving(
                target, PLAINTEXT, timeout_seconds=2
            )
        finally:
            await running.stop(None)

    assert asyncio.run(probe()) == (True, False)


def test_the_probe_fails_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("SWAPLINE_PROBED_PORT", str(port))
    monkeypatch.setenv("SWAPLINE_PROBED_TRANSPORT_SECURITY", "plaintext")
    assert main(["SWAPLINE_PROBED_", "--timeout", "1"]) == 1
