"""The supervisor on a real, cheap service: the decoder, without the rest of the stack."""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.embedded_stack import DEFAULT_MODEL_REPOSITORY
from services.cli.process_supervisor import (
    FIRST_RESTART_DELAY_SECONDS,
    MAX_RESTART_DELAY_SECONDS,
    STABLE_RUN_SECONDS,
    TRITON_NAME,
    ProcessSupervisor,
    ServiceRestart,
    next_crash_count,
    restart_delay,
)
from services.triton.server_process import EmbeddedTriton

STARTUP_TIMEOUT = 60.0


def decoder_env(media_root: Path, socket_path: Path) -> dict[str, str]:
    return {
        "SWAPLINE_DECODER_HOST": "127.0.0.1",
        "SWAPLINE_DECODER_PORT": "0",
        "SWAPLINE_DECODER_METRICS_PORT": "-1",
        "SWAPLINE_DECODER_MEDIA_ROOT": str(media_root),
        "SWAPLINE_DECODER_UNIX_SOCKET": str(socket_path),
        "SWAPLINE_DECODER_TRANSPORT_SECURITY": "plaintext",
        "SWAPLINE_DECODER_AUTH_MODE": "open",
    }


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # A unix socket path must stay within 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="swapline-test-") as directory:
        yield Path(directory) / "decoder.sock"


@pytest.fixture
def restarts_seen() -> list[ServiceRestart]:
    return []


@pytest.fixture
def supervisor(tmp_path: Path, socket_path: Path, restarts_seen: list[ServiceRestart]) -> Iterator[ProcessSupervisor]:
    running = ProcessSupervisor(tmp_path / "logs", STARTUP_TIMEOUT, on_restart=restarts_seen.append)
    try:
        running.start({"decoder": decoder_env(tmp_path, socket_path)})
        yield running
    finally:
        running.stop(timeout=10)


def test_a_killed_service_comes_back_on_the_same_addresses(
    supervisor: ProcessSupervisor, socket_path: Path, restarts_seen: list[ServiceRestart]
) -> None:
    address = supervisor.service("decoder").address
    killed = supervisor.pid("decoder")
    os.kill(killed, signal.SIGKILL)
    restarted = supervisor.wait_restarted("decoder", killed, timeout=STARTUP_TIMEOUT)
    assert restarted != killed and supervisor.pid("decoder") == restarted
    assert supervisor.service("decoder").address == address
    assert serving(address)
    assert serving(f"unix:{socket_path}")
    assert supervisor.restarts() == {"decoder": 1}
    assert restarts_seen == [ServiceRestart("decoder", -signal.SIGKILL, 1)]
    assert restarts_seen[0].describe() == f"restarted decoder (exit {-signal.SIGKILL}), restart 1"


def test_no_child_is_restarted_once_stopping_has_begun(
    tmp_path: Path, socket_path: Path, restarts_seen: list[ServiceRestart]
) -> None:
    supervisor = ProcessSupervisor(tmp_path / "logs", STARTUP_TIMEOUT, on_restart=restarts_seen.append)
    slow_socket = socket_path.with_name("slow.sock")
    try:
        supervisor.start(
            {
                "decoder": decoder_env(tmp_path, socket_path),
                "decoder-slow": decoder_env(tmp_path, slow_socket),
            }
        )
    except BaseException:
        supervisor.stop(timeout=10)
        raise
    # A stopped child ignores SIGTERM, so stop() spends its whole timeout on it; meanwhile the other child
    # died just before the stop and its restart delay runs out.
    os.kill(supervisor.pid("decoder-slow"), signal.SIGSTOP)
    os.kill(supervisor.pid("decoder"), signal.SIGKILL)
    stop_timeout = 4 * FIRST_RESTART_DELAY_SECONDS
    stopper = threading.Thread(target=supervisor.stop, args=(stop_timeout,))
    stopper.start()
    # A supervisor still restarting would wait on the replacement, which stop() never saw, forever.
    stopper.join(timeout=STARTUP_TIMEOUT)
    assert not stopper.is_alive()
    assert restarts_seen == []
    assert (tmp_path / "logs" / "decoder.log").read_text().count("listening on") == 1
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("supervise-")]


def test_a_killed_tritonserver_is_restarted_on_the_same_url(
    tmp_path: Path, restarts_seen: list[ServiceRestart]
) -> None:
    triton = EmbeddedTriton(DEFAULT_MODEL_REPOSITORY, tmp_path / "triton", models=["mtcnn_rnet"], startup_timeout=60)
    supervisor = ProcessSupervisor(tmp_path / "logs", STARTUP_TIMEOUT, on_restart=restarts_seen.append)
    triton.start()
    try:
        supervisor.supervise_triton(triton)
        url = triton.grpc_url
        killed = supervisor.pid(TRITON_NAME)
        os.kill(killed, signal.SIGKILL)
        restarted = supervisor.wait_restarted(TRITON_NAME, killed, timeout=2 * STARTUP_TIMEOUT)
        assert restarted != killed and triton.grpc_url == url
        client = triton_grpc.InferenceServerClient(url)
        try:
            assert client.is_model_ready("mtcnn_rnet")
        finally:
            client.close()
        assert supervisor.restarts() == {TRITON_NAME: 1}
        assert restarts_seen == [ServiceRestart(TRITON_NAME, None, 1)]
    finally:
        supervisor.stop(timeout=10)
        triton.stop()


def test_a_crash_loop_backs_off_to_a_ceiling() -> None:
    delays = [restart_delay(crashes) for crashes in range(1, 12)]
    assert delays[0] == FIRST_RESTART_DELAY_SECONDS
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))
    assert delays[3] == 8 * FIRST_RESTART_DELAY_SECONDS
    assert delays[-1] == MAX_RESTART_DELAY_SECONDS


def test_a_child_that_ran_long_enough_is_not_crash_looping() -> None:
    assert next_crash_count(5, ran_seconds=STABLE_RUN_SECONDS) == 1
    assert next_crash_count(5, ran_seconds=1.0) == 6
    assert next_crash_count(0, ran_seconds=1.0) == 1
