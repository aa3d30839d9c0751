"""The one renderer of ``WWW-Authenticate`` challenges (RFC 6750 §3, RFC 9449 §7.1, RFC 9728 §5.1).

Receiving side. Every integration (FastAPI, ASGI, Flask, Django, through the shared
``Gate``), :func:`~m2m_client.verify.dpop_challenge` and ``DPoPChecker.challenge`` render
through :func:`challenge`, and :class:`Challenges` picks which challenge each answer carries,
so a value can never be escaped one way here and another way there (a test fails if a second
renderer appears). The calling side's parser of these values is ``m2m_client._refusal``. A
parameter value is a quoted-string (RFC 9110 §5.6.4) whose characters are limited to what RFC
6750 §3 allows in ``error_description`` (%x20-21 / %x23-5B / %x5D-7E): anything else -- ``"``,
``\\``, CR, LF, other controls, non-ASCII -- is percent-encoded (UTF-8), never dropped and
never sent raw, so no value can end the string, add a parameter or a header line, or reach a
header as bytes a server refuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from m2m_client.errors import ConfigurationError, DPoPProofError, VerificationError

__all__ = ["Challenges", "challenge", "quoted"]

_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# RFC 6749 §3.3: a scope token; names that are not one cannot go in scope="...".
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
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


Param = tuple[str, str | None]


class Challenges:
    """Which challenges each answer of one protected resource carries (receiving side).

    ``resource_metadata`` (RFC 9728 §5.1) is named in every challenge; ``algs`` is the DPoP
    challenge's list of accepted proof algorithms (RFC 9449 §7.1); ``policy`` the verifier's
    DPoP policy (``"disabled"``, ``"allowed"``, ``"required"``).
    """

    __slots__ = ("resource_metadata",)

    def __init__(self, resource_metadata: str | None) -> None:
        if resource_metadata is not None and (
            not isinstance(resource_metadata, str)
            or not resource_metadata.startswith(("https://", "http://"))
        ):
            raise ConfigurationError("resource_metadata must be an http(s) URL")
        self.resource_metadata = resource_metadata

    def bearer(self, *params: Param) -> str:
        return challenge("Bearer", *params, ("resource_metadata", self.resource_metadata))

    def dpop(self, algs: str, *params: Param) -> str:
        return challenge(
            "DPoP", *params, ("algs", algs), ("resource_metadata", self.resource_metadata)
        )

    def no_token(self, policy: str, algs: str) -> str:
        """A request without (usable) credentials: every scheme the policy takes, no error."""
        if policy == "disabled":
            return self.bearer()
        return self.dpop(algs) if policy == "required" else f"{self.bearer()}, {self.dpop(algs)}"

    def insufficient_scope(
        self, use_dpop: bool, algs: str, description: str, missing_scopes: Iterable[str]
    ) -> str:
        """A 403 (RFC 6750 §3.1): the scopes lacking that a scope token can name."""
        scopes = " ".join(s for s in missing_scopes if _SCOPE_TOKEN.fullmatch(s))
        params = (
            ("error", "insufficient_scope"),
            ("error_description", description),
            ("scope", scopes[:1000]),
        )
        return self.dpop(algs, *params) if use_dpop else self.bearer(*params)

    def invalid(self, exc: VerificationError, policy: str, use_dpop: bool, algs: str) -> str:
        """A 401 refusing the token or its proof.

        RFC 9449 §7.1: the DPoP challenge names the error, and algs; under ``"allowed"`` the
        other scheme is offered too, so either kind of client learns what to send.
        """
        description = ("error_description", str(exc))
        if policy == "disabled":
            return self.bearer(("error", "invalid_token"), description)
        if use_dpop or isinstance(exc, DPoPProofError):
            code = exc.error_code if isinstance(exc, DPoPProofError) else "invalid_token"
            value = self.dpop(algs, ("error", code), description)
            return f"{value}, {self.bearer()}" if policy == "allowed" else value
        return f"{self.bearer(('error', 'invalid_token'), description)}, {self.dpop(algs)}"
