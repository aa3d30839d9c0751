"""Redis key names and entry values of the shared token cache. Pure: no I/O, no clock.

What an entry belongs to (issue 18): a process finds and opens an entry only if it holds the
same credential and asks for the same thing. Every name is an HMAC of the whole cache key
(endpoint, client, audience, resource, scopes, DPoP key, auth method, extra parameters) and of
a keyed fingerprint of the credential; every value is sealed with a key derived from the fleet
key *and* that fingerprint, with the name as associated data. The fleet key is the
``encryption_key``; without one, it is a public constant plus the namespace, so names and MACs
then rest on the credential alone (see docs/security.md for what that does and does not give).
Every name of one cache key carries the same Redis Cluster hash tag (``{...}``), so the token,
its lease and its negative entry live in one slot and one Lua script can touch them all.

Values start with a version byte. With an ``encryption_key`` they are AES-256-GCM; without one,
JSON followed by an HMAC-SHA256 tag. Either way the payload carries the entry's kind and its
absolute expiry, authenticated: storage TTLs can only shorten an entry's life. A value that
does not decode is a miss, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from m2m_client._token import AccessToken, CacheKey
from m2m_client.errors import ConfigurationError, TokenEndpointError

__all__ = ["Codec", "KeyNames", "NegativeEntry", "TokenEntry", "UndecodableEntry"]

PLAIN = 0x03
"""Version byte: UTF-8 JSON + 32-byte HMAC-SHA256 tag over (version, name, JSON)."""
SEALED = 0x04
"""Version byte: 12-byte nonce + AES-256-GCM(JSON), associated data = the Redis key name."""
_OLD_FORMATS = {0x01: "plain", 0x02: "sealed"}
"""Formats of m2m-client before issue 18 (no credential binding, no sealed expiry): misses."""

_MIN_KEY_BYTES = 16
MAX_VALUE_BYTES = 64 * 1024
"""Larger values are refused unread: a token entry is a few KiB, even for a fat JWT."""
_NONCE_BYTES = 12
_TAG_BYTES = 32
# Without an encryption key the fleet key is this constant plus the namespace, both public:
# names and MACs then protect only as well as the credential they fingerprint (a random
# client secret or a private key: nobody can guess it; a weak secret: guessable offline).
_UNKEYED_ROOT = b"m2m-client shared token cache: no encryption key; namespace="
_INFO = b"m2m-client shared token cache v2: "


class UndecodableEntry(Exception):
    """A value that is garbage, of a foreign format, or sealed with another key. Never escapes."""


@dataclass(frozen=True, slots=True)
class KeyNames:
    """The Redis names for one cache key (all in one Cluster slot), and the key its values
    are sealed with (derived from the fleet key and the credential's fingerprint)."""

    token: str
    lease: str
    negative: str
    channel: str
    entry_key: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A token as stored: its absolute expiry and lifetime on the writer's clock.

    A reader takes the shorter of this expiry and the Redis TTL (see ``SharedCore.token_from``).
    """

    access_token: str
    token_type: str
    scope: str | None
    expires_at: float
    lifetime: float


@dataclass(frozen=True, slots=True)
class NegativeEntry:
    """An OAuth error (RFC 6749 §5.2) shared for a while by the processes of one credential."""

    error: str
    error_description: str | None
    status_code: int | None
    error_uri: str | None
    expires_at: float = 0.0

    def exception(self) -> TokenEndpointError:
        return TokenEndpointError(
            self.error,
            self.error_description,
            status_code=self.status_code,
            error_uri=self.error_uri,
        )


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class Codec:
    """Names and seals entries for one namespace."""

    __slots__ = ("_credential_key", "_entry_key", "_name_key", "encrypted", "namespace")

    def __init__(self, namespace: str, encryption_key: str | bytes | None) -> None:
        if not namespace or any(c in namespace for c in "{} \t\r\n"):
            raise ConfigurationError(
                f"namespace must be a non-empty string without braces or spaces, not {namespace!r}"
            )
        self.namespace = namespace
        if encryption_key is None:
            root = _UNKEYED_ROOT + namespace.encode()
        else:
            root = encryption_key.encode() if isinstance(encryption_key, str) else encryption_key
            if not isinstance(root, bytes) or len(root) < _MIN_KEY_BYTES:
                raise ConfigurationError(
                    f"encryption_key must be at least {_MIN_KEY_BYTES} bytes (str or bytes); make "
                    "one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        self.encrypted = encryption_key is not None
        # A different encryption key gives different names too: two fleets with different keys
        # in one namespace never overwrite each other's entries.
        self._name_key = _derive(root, _INFO + b"key names")
        self._credential_key = _derive(root, _INFO + b"credential fingerprints")
        self._entry_key = _derive(root, _INFO + b"entry keys")

    def names(self, key: CacheKey) -> KeyNames:
        credential = key.credential
        # Keyed: a plain hash of a secret in a key name would let anyone who can list Redis
        # test guesses of the secret offline.
        fingerprint = hmac.new(
            self._credential_key,
            b"none" if credential is None else credential.kind.encode() + b"\0" + credential.digest,
            hashlib.sha256,
        ).digest()
        material = json.dumps(
            [
                self.namespace,
                key.endpoint,
                key.client_id,
                key.audience,
                key.resource,
                list(key.scopes),
                key.dpop_jkt,
                key.auth_method,
                [list(pair) for pair in key.extra_params],
                fingerprint.hex(),
            ],
            separators=(",", ":"),
        ).encode()
        tag = hmac.new(self._name_key, material, hashlib.sha256).hexdigest()[:32]
        base = f"{self.namespace}:{{{tag}}}"
        # The name alone (public) does not give the key: it needs the fingerprint, which
        # needs the credential. Holding the fleet key is not enough to open another's entry.
        entry_key = hmac.new(self._entry_key, fingerprint, hashlib.sha256).digest()
        return KeyNames(
            f"{base}:token", f"{base}:lease", f"{base}:error", f"{base}:wake", entry_key
        )

    # --- values -----------------------------------------------------------------------

    def seal(self, names: KeyNames, name: str, payload: dict[str, Any]) -> bytes:
        """``payload`` stored under ``name`` (one of ``names``), bound to that name."""
        data = json.dumps(payload, separators=(",", ":")).encode()
        if not self.encrypted:
            return bytes([PLAIN]) + data + _mac(names.entry_key, name, data)
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(names.entry_key).encrypt(nonce, data, name.encode())
        return bytes([SEALED]) + nonce + sealed

    def open(self, names: KeyNames, name: str, value: bytes) -> dict[str, Any]:
        if not value:
            raise UndecodableEntry("empty value")
        if len(value) > MAX_VALUE_BYTES:
            raise UndecodableEntry(f"{len(value)} bytes, more than {MAX_VALUE_BYTES}")
        version, body = value[0], value[1:]
        if version in _OLD_FORMATS:
            raise UndecodableEntry(f"a {_OLD_FORMATS[version]} entry of an older m2m-client")
        if self.encrypted:
            # Accepting a plain value when we encrypt would let anyone who can write to Redis
            # plant a token of their choosing.
            if version != SEALED or len(body) <= _NONCE_BYTES:
                raise UndecodableEntry(f"not a sealed entry (version byte {version:#04x})")
            try:
                aead = AESGCM(names.entry_key)
                data = aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], name.encode())
            except InvalidTag:
                raise UndecodableEntry(
                    "does not decrypt with this encryption_key and credential"
                ) from None
        elif version == SEALED:
            raise UndecodableEntry("an encrypted entry, and this cache has no encryption_key")
        elif version != PLAIN:
            raise UndecodableEntry(f"unknown format (version byte {version:#04x})")
        else:
            data, tag = body[:-_TAG_BYTES], body[-_TAG_BYTES:]
            if len(body) <= _TAG_BYTES or not hmac.compare_digest(
                tag, _mac(names.entry_key, name, data)
            ):
                raise UndecodableEntry("its MAC does not match this name and credential")
        try:
            payload = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise UndecodableEntry("not JSON") from None
        if not isinstance(payload, dict):
            raise UndecodableEntry("not a JSON object")
        return payload

    def encode_token(self, names: KeyNames, token: AccessToken) -> bytes:
        payload = {
            "k": "token",
            "x": token.expires_at,
            "l": token.expires_at - token.issued_at,
            "t": token.access_token,
            "y": token.token_type,
            "s": token.scope,
        }
        return self.seal(names, names.token, payload)

    def decode_token(self, names: KeyNames, value: bytes) -> TokenEntry:
        p = self.open(names, names.token, value)
        if p.get("k") != "token":
            raise UndecodableEntry("not a token entry")
        access_token, token_type, scope = p.get("t"), p.get("y"), p.get("s")
        if not isinstance(access_token, str) or not access_token or not isinstance(token_type, str):
            raise UndecodableEntry("token entry without a token")
        if scope is not None and not isinstance(scope, str):
            raise UndecodableEntry("token entry with a bad scope")
        expires_at, lifetime = _number(p.get("x")), _number(p.get("l"))
        if expires_at is None or lifetime is None or lifetime <= 0:
            raise UndecodableEntry("token entry with a bad expiry")
        return TokenEntry(access_token, token_type, scope, expires_at, lifetime)

    def encode_error(self, names: KeyNames, error: TokenEndpointError, expires_at: float) -> bytes:
        """The error, to be shared until ``expires_at`` (seconds since the epoch)."""
        payload = {
            "k": "error",
            "x": expires_at,
            "e": error.error,
            "d": error.error_description,
            "c": error.status_code,
            "u": error.error_uri,
        }
        return self.seal(names, names.negative, payload)

    def decode_error(self, names: KeyNames, value: bytes) -> NegativeEntry:
        p = self.open(names, names.negative, value)
        if p.get("k") != "error":
            raise UndecodableEntry("not an error entry")
        error, description, status, uri = p.get("e"), p.get("d"), p.get("c"), p.get("u")
        expires_at = _number(p.get("x"))
        if expires_at is None:
            raise UndecodableEntry("error entry with a bad expiry")
        if not isinstance(error, str) or not error:
            raise UndecodableEntry("error entry without an error code")
        if description is not None and not isinstance(description, str):
            raise UndecodableEntry("error entry with a bad description")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise UndecodableEntry("error entry with a bad status")
        if uri is not None and not isinstance(uri, str):
            raise UndecodableEntry("error entry with a bad uri")
        return NegativeEntry(error, description, status, uri, expires_at)


def _mac(entry_key: bytes, name: str, data: bytes) -> bytes:
    # The version byte and the name are covered: a value copied under another name, or
    # re-labelled as another format, does not verify.
    message = bytes([PLAIN]) + name.encode() + b"\0" + data
    return hmac.new(entry_key, message, hashlib.sha256).digest()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
