"""Errors in the OpenAI error schema: ``{"error": {"message", "type", "param", "code"}}`` with a status code."""

from __future__ import annotations

from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error a client gets back: a status code and a one-line message."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        message = (message.strip().splitlines() or [type(self).__name__])[0]
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return {
            "error": {
                "message": self.message,
                "type": TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, code: str | None = None, param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)
