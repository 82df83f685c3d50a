"""Client channels with the same message limits as the servers, and keepalive for long streams."""

from __future__ import annotations

import grpc

from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES


def open_channel(target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """`dns:///name:port` targets are balanced round-robin across a headless Service's pods."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.lb_policy_name", "round_robin"),
    ]
    return grpc.aio.insecure_channel(target, options=options)
