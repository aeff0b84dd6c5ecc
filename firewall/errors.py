"""Why a request was not answered, and what the client is told.

Each rejection maps to one gRPC status and one generic client message. The internal detail goes
to the log only, so a client never learns which detector fired, a score or a path.
"""

from __future__ import annotations

import grpc


class Rejection(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    public_message: str = "internal error"

    def __init__(self, detail: str = ""):
        super().__init__(detail or self.public_message)
        self.detail = detail or self.public_message


class InvalidInput(Rejection):
    """Malformed input. Its detail describes the expected format only, so it is shown as is."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    public_message = "invalid input"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.public_message = detail


class TooLarge(Rejection):
    """A message over ``max_message_bytes``. The message names no limit (gRPC core's own would)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    public_message = "request too large"


class UnknownModel(Rejection):
    code = grpc.StatusCode.NOT_FOUND
    public_message = "unknown model"


class Refused(Rejection):
    code = grpc.StatusCode.PERMISSION_DENIED
    public_message = "request refused"


class Banned(Refused):
    """Refused because of a ban. The client sees the same status and message as any refusal."""


class Throttled(Rejection):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    public_message = "too many requests"


class Expired(Throttled):
    """Dropped before a worker took it: the request's deadline passed while it was queued."""


class Unavailable(Rejection):
    code = grpc.StatusCode.UNAVAILABLE
    public_message = "model unavailable"


class StoreUnavailable(Unavailable):
    """The shared state store cannot be reached and its ``fail_mode`` is closed."""
