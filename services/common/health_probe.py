"""`python -m services.common.health_probe SWAPLINE_DECODER_`: exit 0 when the service in this pod is SERVING.

Kubernetes' built-in gRPC probes speak plaintext only, so a TLS listener needs an exec probe. This one
reads the service's own settings (the same environment, under the given prefix): it trusts the service's
CA and, under mtls, shows the service's certificate. Health checks need no token.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_channel import ChannelSecurity, channel_credentials, channel_options
from services.common.server_settings import ServerSettings
from services.common.settings_loader import load_settings
from services.common.token_file import read_secret_file

# The name the probe expects in the server's certificate when it connects to 127.0.0.1.
DEFAULT_SERVER_NAME = "localhost"


def probe_security(settings: ServerSettings) -> ChannelSecurity:
    if settings.transport_security == "plaintext":
        return ChannelSecurity()
    roots = read_secret_file(settings.tls_ca_file, "tls_ca_file", "to verify the service's certificate")
    key_pair = None
    if settings.transport_security == "mtls":
        key_pair = (
            read_secret_file(settings.tls_key_file, "tls_key_file", "under mtls"),
            read_secret_file(settings.tls_cert_file, "tls_cert_file", "under mtls"),
        )
    return ChannelSecurity(tls=True, root_certificates=roots, client_key_pair=key_pair)


async def is_serving(
    target: str, security: ChannelSecurity, server_name: str = DEFAULT_SERVER_NAME, timeout_seconds: float = 5.0
) -> bool:
    options = channel_options()
    if security.tls:
        options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.aio.secure_channel(target, channel_credentials(security), options=options)
    else:
        channel = grpc.aio.insecure_channel(target, options=options)
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_seconds
            )
        except grpc.aio.AioRpcError as error:
            print(f"health check of {target} failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.health_probe", description=__doc__)
    parser.add_argument("prefix", help="the service's settings prefix, e.g. SWAPLINE_DECODER_")
    parser.add_argument("--internal", action="store_true", help="probe internal_port instead of port")
    parser.add_argument("--server-name", default=DEFAULT_SERVER_NAME, help="a name the certificate holds")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    settings = load_settings(ServerSettings, args.prefix)
    port = settings.internal_port if args.internal else settings.port
    serving = asyncio.run(is_serving(f"127.0.0.1:{port}", probe_security(settings), args.server_name, args.timeout))
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
