"""Generated gRPC registrations and stubs with the (de)serialisers of chosen methods replaced.

The frame streams use frame_wire's codecs instead of the generated message classes; everything else
about a service (its other methods, names, paths, reflection) stays as generated. One codec table per
service serves both ends: the server takes its request deserialiser and response serialiser, a stub
its request serialiser and response deserialiser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from services.common.errors import Internal

StubT = TypeVar("StubT")


@dataclass(frozen=True)
class MethodCodec:
    """Replacements for one method's generated functions; None keeps the generated one."""

    request_serializer: Callable[[Any], bytes] | None = None
    request_deserializer: Callable[[bytes], Any] | None = None
    response_serializer: Callable[[Any], bytes] | None = None
    response_deserializer: Callable[[bytes], Any] | None = None

    def server_side(self) -> dict[str, Callable[..., Any]]:
        return _given(request_deserializer=self.request_deserializer, response_serializer=self.response_serializer)

    def client_side(self) -> dict[str, Callable[..., Any]]:
        return _given(request_serializer=self.request_serializer, response_deserializer=self.response_deserializer)


def _given(**functions: Callable[..., Any] | None) -> dict[str, Callable[..., Any]]:
    return {name: function for name, function in functions.items() if function is not None}


def _check_methods(codecs: Mapping[str, MethodCodec], methods: Mapping[str, Any], generated: str) -> None:
    for method in codecs:
        if method not in methods:
            raise Internal(f"{generated} has no method {method!r}")


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
        _check_methods(codecs, handlers, add_to_server.__name__)
        for method, codec in codecs.items():
            handlers[method] = handlers[method]._replace(**codec.server_side())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.service_name, handlers),))
        server.add_registered_method_handlers(recorder.service_name, handlers)

    return register


class _CallFactory:
    """Stands in for the channel while a generated stub is built: makes its calls, with codecs replaced."""

    def __init__(self, channel: grpc.aio.Channel, codecs: Mapping[str, MethodCodec]) -> None:
        self._channel = channel
        self._codecs = codecs
        self.methods: dict[str, str] = {}

    def _call(self, kind: str, path: str, **functions: Any) -> Any:
        method = path.rsplit("/", 1)[-1]
        self.methods[method] = path
        codec = self._codecs.get(method)
        replaced = {**functions, **(codec.client_side() if codec else {})}
        return getattr(self._channel, kind)(path, **replaced)

    def unary_unary(self, path: str, **functions: Any) -> Any:
        return self._call("unary_unary", path, **functions)

    def unary_stream(self, path: str, **functions: Any) -> Any:
        return self._call("unary_stream", path, **functions)

    def stream_unary(self, path: str, **functions: Any) -> Any:
        return self._call("stream_unary", path, **functions)

    def stream_stream(self, path: str, **functions: Any) -> Any:
        return self._call("stream_stream", path, **functions)


def stub_with_codecs(
    stub_class: Callable[[Any], StubT], channel: grpc.aio.Channel, codecs: Mapping[str, MethodCodec]
) -> StubT:
    """The generated stub over `channel`, with the given methods' codecs replaced."""
    factory = _CallFactory(channel, codecs)
    stub = stub_class(factory)
    _check_methods(codecs, factory.methods, getattr(stub_class, "__name__", "the stub"))
    return stub
