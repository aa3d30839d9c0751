"""What a resource server's refusal says about the token (RFC 6750 §3.1, RFC 9449 §7.1).

Pure: ``BearerAuth`` asks :func:`token_refused` whether a response means "this token is no
good" (drop it, get another, replay) or "this request is not allowed" (return the answer: a
new token would be refused the same way, and dropping a token valid for an hour during an
authorization-server outage turns one refused call into every later call failing).
"""

from __future__ import annotations

from collections.abc import Iterable

from ._dpop import parse_www_authenticate

__all__ = ["token_refused"]

# The challenge schemes a token client's token is presented with.
_SCHEMES = frozenset({"bearer", "dpop"})


def token_refused(status_code: int, www_authenticate: str | Iterable[str]) -> bool:
    """Whether the answer refuses the token itself, so that a new token may succeed.

    Only a 401 can (a 403 says the token is valid but lacks the right). Among its ``Bearer``
    and ``DPoP`` challenges, ``error="invalid_token"`` refuses the token; any other error
    (``insufficient_scope``, ``invalid_request``, ``invalid_dpop_proof``, ``use_dpop_nonce``)
    does not. A 401 whose challenges name no error (or that has none, or one that cannot be
    parsed) is taken as a refused token: many APIs send a bare ``WWW-Authenticate: Bearer``.

    >>> token_refused(401, 'Bearer error="insufficient_scope", scope="write"')
    False
    """
    if status_code != 401:
        return False
    errors = {
        params["error"].strip().lower()
        for scheme, params in parse_www_authenticate(www_authenticate)
        if scheme in _SCHEMES and "error" in params
    }
    return not errors or "invalid_token" in errors
