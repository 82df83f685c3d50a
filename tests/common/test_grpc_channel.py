from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services.common.grpc_channel import (
    CA_FILE_ENV,
    PLAINTEXT,
    TOKEN_ENV,
    channel_options,
    channel_security,
    client_security_from_env,
    open_channel,
)
from services.common.grpc_keepalive import KEEPALIVE
from services.common.grpc_server import server_options
from services.common.server_settings import ServerSettings
from services.common.settings_loader import SettingsError
from services.common.triton_client import TritonClient
from tests.common.tls_files import Pki

# The name two "pods" stand behind, as a headless Service's name stands for its ready pods.
SERVICE_NAME = "pods.swapline.test"
POD_ADDRESSES = ("127.0.0.1", "127.0.0.2")
# Long enough for a connection to age out and the client's next resolution to be allowed.
NEW_POD_FOUND_WITHIN_SECONDS = 8.0


def test_channels_use_the_shared_keepalive_policy() -> None:
    assert set(KEEPALIVE.client_options()) <= set(channel_options())


def test_a_service_reads_its_ca_certificate_and_internal_token(pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "internal-token"
    token_file.write_text("internal-token-b93e2d\n")
    settings = ServerSettings(
        transport_security="mtls",
        tls_cert_file=pki.client.cert_file,
        tls_key_file=pki.client.key_file,
        tls_ca_file=pki.ca_file,
        internal_token_file=token_file,
    )
    security = channel_security(settings)
    assert security.tls
    assert security.root_certificates == pki.ca_file.read_bytes()
    assert security.client_key_pair == (pki.client.key_file.read_bytes(), pki.client.cert_file.read_bytes())
    assert security.token is not None and security.token.value == "internal-token-b93e2d"


def test_plaintext_open_services_need_no_files() -> None:
    security = channel_security(ServerSettings(transport_security="plaintext", auth_mode="open"))
    assert (security.tls, security.token) == (False, None)


def test_token_mode_without_mtls_needs_the_internal_token() -> None:
    with pytest.raises(SettingsError, match="internal_token_file must be set") as raised:
        channel_security(ServerSettings(transport_security="plaintext"))
    assert raised.value.field_name == "internal_token_file"


def test_tls_needs_the_ca_to_verify_servers() -> None:
    with pytest.raises(SettingsError, match="tls_ca_file must be set"):
        channel_security(ServerSettings(auth_mode="open"))


def test_command_line_clients_read_the_token_and_ca_from_the_environment(pki: Pki) -> None:
    security = client_security_from_env({TOKEN_ENV: " alice-token-4f1c9a\n", CA_FILE_ENV: str(pki.ca_file)})
    assert security.tls and security.root_certificates == pki.ca_file.read_bytes()
    assert security.token is not None and security.token.value == "alice-token-4f1c9a"
    plain = client_security_from_env({})
    assert (plain.tls, plain.token) == (False, None)


def test_a_client_tries_a_server_that_is_down_again_within_two_seconds() -> None:
    options = dict(channel_options())
    assert (options["grpc.initial_reconnect_backoff_ms"], options["grpc.max_reconnect_backoff_ms"]) == (500, 2000)


class FakeDns:
    """A DNS server on a loopback UDP port answering A queries for SERVICE_NAME with `addresses`, which a test
    changes as a headless Service's answer changes when pods come and go."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopping = threading.Event()

    def _answer(self, query: bytes) -> bytes:
        labels, offset = [], 12
        while query[offset]:
            labels.append(query[offset + 1 : offset + 1 + query[offset]].decode())
            offset += 1 + query[offset]
        (query_type,) = struct.unpack("!H", query[offset + 1 : offset + 3])
        known = ".".join(labels).lower() == SERVICE_NAME
        addresses = list(self.addresses) if known and query_type == 1 else []
        # A response to a recursive query: NOERROR for the name (no AAAA records), NXDOMAIN for any other.
        flags = 0x8180 if known else 0x8183
        answer = struct.pack("!HHHHHH", int.from_bytes(query[:2], "big"), flags, 1, len(addresses), 0, 0)
        answer += query[12 : offset + 5]
        for address in addresses:
            answer += struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address)
        return answer

    def _serve(self) -> None:
        while True:
            query, client = self._socket.recvfrom(4096)
            if self._stopping.is_set():
                return
            self._socket.sendto(self._answer(query), client)

    @contextmanager
    def running(self) -> Iterator[FakeDns]:
        self._thread.start()
        try:
            yield self
        finally:
            # A datagram of its own wakes the server from its wait to see that it is stopping.
            self._stopping.set()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
                waker.sendto(b"", ("127.0.0.1", self.port))
            self._thread.join(timeout=5)
            self._socket.close()

    def target(self, port: int) -> str:
        """The channel target that resolves SERVICE_NAME through this server (gRPC's c-ares resolver)."""
        return f"dns://127.0.0.1:{self.port}/{SERVICE_NAME}:{port}"


@asynccontextmanager
async def two_pods(
    register: Callable[[grpc.aio.Server, str], None], max_connection_age_seconds: float
) -> AsyncIterator[int]:
    """A server per POD_ADDRESSES on one port, its service `register`ed with its own label ("a", "b") to answer
    with; yields the port."""
    settings = ServerSettings(
        transport_security="plaintext",
        auth_mode="open",
        metrics_port=-1,
        max_connection_age_seconds=max_connection_age_seconds,
        drain_seconds=1,
    )
    servers: list[grpc.aio.Server] = []
    port = 0
    try:
        for label, address in zip("ab", POD_ADDRESSES, strict=True):
            server = grpc.aio.server(options=server_options(settings))
            register(server, label)
            port = server.add_insecure_port(f"{address}:{port}")
            await server.start()
            servers.append(server)
        yield port
    finally:
        for server in servers:
            await server.stop(None)


async def labels_until_the_new_pod_answers(ask: Callable[[], Awaitable[str]], dns: FakeDns) -> set[str]:
    """Only pod "a" in DNS first; then both, as when a new pod becomes ready. Returns who answered, polling
    until "b" does or NEW_POD_FOUND_WITHIN_SECONDS pass."""
    dns.addresses = [POD_ADDRESSES[0]]
    first = {await ask() for _ in range(3)}
    assert first == {"a"}
    dns.addresses = list(POD_ADDRESSES)
    answered: set[str] = set()
    deadline = time.monotonic() + NEW_POD_FOUND_WITHIN_SECONDS
    while "b" not in answered and time.monotonic() < deadline:
        answered.add(await ask())
        await asyncio.sleep(0.05)
    return answered


def _serve_who(server: grpc.aio.Server, label: str) -> None:
    async def name(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return label.encode()

    handler = grpc.method_handlers_generic_handler("test.Who", {"Name": grpc.unary_unary_rpc_method_handler(name)})
    server.add_generic_rpc_handlers((handler,))


def test_a_service_channel_finds_a_pod_added_behind_its_name() -> None:
    async def run(dns: FakeDns) -> set[str]:
        async with two_pods(_serve_who, max_connection_age_seconds=0.3) as port:
            channel = open_channel(dns.target(port), PLAINTEXT)
            call = channel.unary_unary("/test.Who/Name")

            async def ask() -> str:
                answer: bytes = await call(b"", timeout=5)
                return answer.decode()

            try:
                return await labels_until_the_new_pod_answers(ask, dns)
            finally:
                await channel.close()

    with FakeDns().running() as dns:
        assert asyncio.run(run(dns)) == {"a", "b"}


class _LabelledTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's gRPC API, as far as a model's config: its one output is named after the pod."""

    def __init__(self, label: str) -> None:
        self.label = label

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        config = model_config_pb2.ModelConfig(name=request.name)
        config.output.add(name=self.label, data_type=model_config_pb2.TYPE_FP32, dims=[1])
        return service_pb2.ModelConfigResponse(config=config)


def _serve_triton(server: grpc.aio.Server, label: str) -> None:
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_LabelledTriton(label), server)


def test_the_triton_client_finds_a_triton_pod_added_behind_its_name() -> None:
    # The chart gives Triton a max connection age (--grpc-max-connection-age), as the swapline servers have one.
    async def run(dns: FakeDns) -> set[str]:
        async with two_pods(_serve_triton, max_connection_age_seconds=0.3) as port:
            client = TritonClient(dns.target(port), timeout_seconds=5)

            async def ask() -> str:
                (output,) = await client.output_names("face_swapper")
                return output

            try:
                return await labels_until_the_new_pod_answers(ask, dns)
            finally:
                await client.close()

    with FakeDns().running() as dns:
        assert asyncio.run(run(dns)) == {"a", "b"}
