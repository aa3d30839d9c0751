"""What LocalIssuer's request handler answers, and the RFC 6749 error it answers with."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"


class IssuerResponse(NamedTuple):
    """What :meth:`LocalIssuer.handle_request` answers: status, headers and body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response, raised inside the token endpoint and turned into JSON."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


def json_response(status: int, payload: Mapping[str, Any], **headers: str) -> IssuerResponse:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return IssuerResponse(status, {"Content-Type": JSON_TYPE, **headers}, body)


def words(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A space-separated string or an iterable of strings, as a tuple of words."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(value)


def form_params(body: bytes) -> dict[str, str]:
    """Parse a form-urlencoded body; a repeated or undecodable parameter is invalid_request."""
    try:
        text = body.decode("ascii")
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "the body is not valid form-urlencoded data") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        # RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once."
        if name in params:
            raise OAuthError("invalid_request", f"parameter {name!r} is repeated")
        params[name] = value
    return params
