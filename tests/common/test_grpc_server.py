from __future__ import annotations

from services.common.grpc_server import server_options
from services.common.server_settings import ServerSettings


def test_connection_age_is_off_by_default() -> None:
    names = dict(server_options(ServerSettings()))
    assert "grpc.max_connection_age_ms" not in names
    assert names["grpc.max_receive_message_length"] == ServerSettings().max_message_bytes


def test_connection_age_and_its_grace_follow_the_settings() -> None:
    options = dict(server_options(ServerSettings(max_connection_age_seconds=300, drain_seconds=7.5)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_500
