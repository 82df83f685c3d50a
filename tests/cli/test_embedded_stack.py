from __future__ import annotations

from pathlib import Path

from services.cli.embedded_stack import FRAME_SERVICES, frame_service_sockets


def test_without_a_socket_directory_the_frame_services_are_reached_over_tcp() -> None:
    assert frame_service_sockets(None) == {name: ({}, "") for name in FRAME_SERVICES}


def test_each_frame_service_listens_on_its_own_socket_and_is_reached_there() -> None:
    sockets = frame_service_sockets(Path("/tmp/swapline-x"))
    assert sockets["decoder"][0] == {"SWAPLINE_DECODER_UNIX_SOCKET": "/tmp/swapline-x/decoder.sock"}
    assert sockets["decoder"][1] == "unix:/tmp/swapline-x/decoder.sock"
    assert sockets["encoder"][1] == "unix:/tmp/swapline-x/encoder.sock"
    assert len({target for _, target in sockets.values()}) == len(FRAME_SERVICES)
