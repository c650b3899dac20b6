"""Errors the proxy itself answers with (ref 3.5).

Every synthesized response carries ``l5d-proxy-error`` naming the cause, an
empty body and ``content-length: 0``; a gRPC request instead gets HTTP 200 with
``grpc-status`` (and ``grpc-message``) in a trailers-only response. "Fatal"
errors also close the client connection (HTTP/1) after the response.
"""

from __future__ import annotations

from dataclasses import dataclass

# gRPC status codes (grpc/doc/statuscodes.md)
GRPC_NOT_FOUND = 5
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14


@dataclass(frozen=True, slots=True)
class ProxyError:
    status: int
    grpc_status: int
    metric: str  # value of the `error` label of *_http_errors_total
    fatal: bool
    message: str = ""

    def because(self, message: str) -> ProxyError:
        return ProxyError(self.status, self.grpc_status, self.metric, self.fatal, message)


FAILFAST = ProxyError(504, GRPC_DEADLINE_EXCEEDED, "failfast", True, "service in fail-fast")
LOADSHED = ProxyError(503, GRPC_UNAVAILABLE, "loadshed", True, "service unavailable")
CONNECT_TIMEOUT = ProxyError(504, GRPC_DEADLINE_EXCEEDED, "i/o", True, "connect timed out")
IO_ERROR = ProxyError(502, GRPC_UNAVAILABLE, "i/o", True, "connection error")
RESPONSE_TIMEOUT = ProxyError(504, GRPC_DEADLINE_EXCEEDED, "response timeout", True, "response timeout")
NO_ROUTE = ProxyError(404, GRPC_NOT_FOUND, "unexpected", False, "no route")
FORBIDDEN = ProxyError(403, GRPC_PERMISSION_DENIED, "unauthorized", False, "unauthorized request")
IDENTITY_REQUIRED = ProxyError(502, GRPC_UNAVAILABLE, "identity required", True, "identity required")
UNEXPECTED = ProxyError(500, GRPC_INTERNAL, "unexpected", True, "unexpected error")
# Malformed requests: refused before any routing, the connection is closed.
BAD_REQUEST = ProxyError(400, GRPC_INTERNAL, "unexpected", True, "malformed request")
HEADERS_TOO_LARGE = ProxyError(431, GRPC_RESOURCE_EXHAUSTED, "unexpected", True, "request headers too large")


def is_grpc(content_type: str | bytes | None) -> bool:
    if content_type is None:
        return False
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.lower().startswith("application/grpc")


def response_headers(err: ProxyError, grpc: bool, informational: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Status and headers of the synthesized response (HTTP/2 style, lower case)."""
    headers: list[tuple[str, str]] = []
    if grpc:
        headers += [("content-type", "application/grpc"), ("grpc-status", str(err.grpc_status)), ("grpc-message", err.message)]
        status = 200
    else:
        status = err.status
        headers.append(("content-length", "0"))
    if informational:
        headers.append(("l5d-proxy-error", err.message))
    return status, headers
