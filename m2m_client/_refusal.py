"""Calling side: what a resource server's refusal says about the token (RFC 6750 §3.1,
RFC 9449 §7.1), and the ``WWW-Authenticate`` parser that reads it.

The receiving side's counterpart, which *renders* challenges, is
:mod:`m2m_client.verify._www_authenticate`. Pure: ``BearerAuth`` asks :func:`token_refused`
whether a response means "this token is no good" (drop it, get another, replay) or "this
request is not allowed" (return the answer: a new token would be refused the same way, and
dropping a token valid for an hour during an authorization-server outage turns one refused
call into every later call failing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_WWW_AUTHENTICATE", "parse_www_authenticate", "token_refused"]

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


# RFC 9110 §11.6.1 / §11.2: challenge = auth-scheme [ 1*SP ( token68 / #auth-param ) ].
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})\s*(,|$)")
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$|(?=,))")
_TOKEN68 = re.compile(r"\s*([A-Za-z0-9._~+/-]+=*)\s*(,|$)")
MAX_WWW_AUTHENTICATE = 4096


def parse_www_authenticate(values: str | Iterable[str]) -> list[tuple[str, dict[str, str]]]:
    """Challenges of ``WWW-Authenticate`` header value(s): ``[(scheme, params), ...]``.

    Scheme and parameter names are lower-cased (they are case-insensitive); quoted values
    are unquoted. Unparsable input ends the list instead of raising: a server's odd header
    must not break the client.
    """
    items = [values] if isinstance(values, str) else list(values)
    challenges: list[tuple[str, dict[str, str]]] = []
    for text in items:
        text = text[:MAX_WWW_AUTHENTICATE]
        pos = 0
        while pos < len(text):
            match = _SCHEME.match(text, pos)
            if match is None:
                break
            params: dict[str, str] = {}
            challenges.append((match.group(1).lower(), params))
            pos = match.end()
            while pos < len(text):
                param = _PARAM.match(text, pos)
                if param is None:
                    token68 = _TOKEN68.match(text, pos)
                    if token68 is not None and not params:
                        pos = token68.end()
                    break
                name, value = param.group(1).lower(), param.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params.setdefault(name, value)
                pos = param.end()
                if param.group(3) == "":
                    break
                # The next item is a parameter ("x=") or the next challenge's scheme.
                ahead = _PARAM.match(text, pos)
                if ahead is None:
                    break
    return challenges
