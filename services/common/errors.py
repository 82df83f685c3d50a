"""Domain errors, each tied once to the gRPC status code it is answered with."""

from __future__ import annotations

from typing import ClassVar

import grpc


class SwaplineError(Exception):
    """Base of every error a servicer may let escape; the interceptor turns it into a status."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SwaplineError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SwaplineError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SwaplineError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SwaplineError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(SwaplineError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(SwaplineError):
    """No credentials, or none the service trusts (a bearer token, or an mTLS certificate on internal ports)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(SwaplineError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(SwaplineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SwaplineError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SwaplineError):
    code = grpc.StatusCode.CANCELLED


class Internal(SwaplineError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[SwaplineError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}

# Codes whose failure may pass if the same work is tried again elsewhere or later.
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def error_for_code(code: grpc.StatusCode, message: str) -> SwaplineError:
    return _BY_CODE.get(code, Internal)(message)


def error_for_code_value(value: int, message: str) -> SwaplineError:
    """Builds the domain error for a numeric status code as carried in ErrorStatus messages."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return error_for_code(code, message)
    return Internal(message)


def code_value(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def from_rpc_error(error: grpc.RpcError) -> SwaplineError:
    """Carries a downstream service's failure on with its own code and message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for_code(code, details or str(code))
