"""Generated gRPC registrations and stubs with the (de)serialisers of chosen methods replaced.

The frame streams use frame_wire's codecs instead of the generated message classes; everything else
about a service (its other methods, names, reflection) stays as generated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.errors import Internal


@dataclass(frozen=True)
class MethodCodec:
    """Replacements for one method's generated functions; None keeps the generated one."""

    request_deserializer: Callable[[bytes], Any] | None = None
    response_serializer: Callable[[Any], bytes] | None = None


class _HandlerRecorder:
    """Stands in for the server while generated code registers, to catch the method handlers."""

    def __init__(self) -> None:
        self.service_name = ""
        self.handlers: dict[str, Any] | None = None

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the same handlers arrive in add_registered_method_handlers."""

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        self.service_name = service_name
        self.handlers = dict(handlers)


def register_with_codecs(
    add_to_server: Callable[[Any, Any], None], codecs: Mapping[str, MethodCodec]
) -> Callable[[Any, grpc.aio.Server], None]:
    """A ServiceBinding.register: `add_to_server` (generated) with the given methods' codecs replaced."""

    def register(servicer: Any, server: grpc.aio.Server) -> None:
        recorder = _HandlerRecorder()
        add_to_server(servicer, recorder)
        if recorder.handlers is None:
            raise Internal(f"{add_to_server.__name__} registered no method handlers")
        handlers = recorder.handlers
        for method, codec in codecs.items():
            if method not in handlers:
                raise Internal(f"{add_to_server.__name__} has no method {method!r}")
            replaced = {
                name: value
                for name, value in (
                    ("request_deserializer", codec.request_deserializer),
                    ("response_serializer", codec.response_serializer),
                )
                if value is not None
            }
            handlers[method] = handlers[method]._replace(**replaced)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.service_name, handlers),))
        server.add_registered_method_handlers(recorder.service_name, handlers)

    return register
