"""The one renderer of ``WWW-Authenticate`` challenges (RFC 6750 §3, RFC 9449 §7.1, RFC 9728 §5.1).

Every integration (FastAPI, ASGI, Flask, Django) and :func:`~m2m_client.verify.dpop_challenge`
render through :func:`challenge`, so a value can never be escaped one way here and another
way there. A parameter value is a quoted-string (RFC 9110 §5.6.4) whose characters are
limited to what RFC 6750 §3 allows in ``error_description`` (%x20-21 / %x23-5B / %x5D-7E):
anything else -- ``"``, ``\\``, CR, LF, other controls, non-ASCII -- is percent-encoded
(UTF-8), never dropped and never sent raw, so no value can end the string, add a parameter
or a header line, or reach a header as bytes a server refuses.
"""

from __future__ import annotations

import re

__all__ = ["challenge", "quoted"]

_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
#: The longest value rendered (an error description quoting a long claim stays short).
MAX_VALUE = 300


def _percent(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match.group().encode("utf-8", "surrogatepass"))


def quoted(value: str, limit: int = MAX_VALUE) -> str:
    """``value`` as a safe quoted-string: unsafe characters percent-encoded, then cut."""
    out = _UNSAFE.sub(_percent, value)
    if len(out) > limit:
        out = out[: limit - 3]
        # Never cut a %XX escape in half.
        cut = out.rfind("%", len(out) - 2)
        out = (out[:cut] if cut != -1 else out) + "..."
    return f'"{out}"'


def challenge(scheme: str, *params: tuple[str, str | None]) -> str:
    """``scheme k1="v1", k2="v2"``: parameters whose value is None are left out."""
    rendered = [
        f"{name}={quoted(value, 1000 if name == 'scope' else MAX_VALUE)}"
        for name, value in params
        if value
    ]
    return f"{scheme} " + ", ".join(rendered) if rendered else scheme
