"""Redis key names and entry values of the shared token cache. Pure: no I/O, no clock.

Key names are an HMAC of the whole cache key, so a Redis ``KEYS *`` shows no token endpoint,
client id, audience or scope. Every name of one cache key carries the same Redis Cluster hash
tag (``{...}``), so the token, its lease and its negative entry live in one slot and one Lua
script can touch them all.

Values start with a version byte. With an ``encryption_key`` they are AES-256-GCM (key from
HKDF-SHA256) with the Redis key name as associated data, so a value copied under another key
name does not decrypt either. A value that does not decode is a miss, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from m2m_client._token import AccessToken, CacheKey
from m2m_client.errors import ConfigurationError, TokenEndpointError

__all__ = ["Codec", "KeyNames", "NegativeEntry", "TokenEntry", "UndecodableEntry"]

PLAIN = 0x01
"""Version byte: UTF-8 JSON, no encryption."""
SEALED = 0x02
"""Version byte: 12-byte nonce + AES-256-GCM(JSON), associated data = the Redis key name."""

_MIN_KEY_BYTES = 16
MAX_VALUE_BYTES = 64 * 1024
"""Larger values are refused unread: a token entry is a few KiB, even for a fat JWT."""
_NONCE_BYTES = 12
# Without an encryption key the names are still keyed, with a constant: this hides the client id
# from a casual look at Redis, but anyone who can guess a client id can recompute the name.
_UNKEYED_NAME_KEY = b"m2m-client shared token cache: key names without an encryption key"


class UndecodableEntry(Exception):
    """A value that is garbage, of a foreign format, or sealed with another key. Never escapes."""


@dataclass(frozen=True, slots=True)
class KeyNames:
    """The Redis names for one cache key (all in one Cluster slot)."""

    token: str
    lease: str
    negative: str
    channel: str


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A token as stored: its lifetime, never an absolute time (clocks differ across hosts)."""

    access_token: str
    token_type: str
    scope: str | None
    lifetime: float


@dataclass(frozen=True, slots=True)
class NegativeEntry:
    """An OAuth error (RFC 6749 §5.2) shared by the fleet for a while."""

    error: str
    error_description: str | None
    status_code: int | None
    error_uri: str | None

    def exception(self) -> TokenEndpointError:
        return TokenEndpointError(
            self.error,
            self.error_description,
            status_code=self.status_code,
            error_uri=self.error_uri,
        )

    @classmethod
    def from_exception(cls, error: TokenEndpointError) -> NegativeEntry:
        return cls(error.error, error.error_description, error.status_code, error.error_uri)


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class Codec:
    """Names and (optionally) encrypts entries for one namespace."""

    __slots__ = ("_aead", "_name_key", "namespace")

    def __init__(self, namespace: str, encryption_key: str | bytes | None) -> None:
        if not namespace or any(c in namespace for c in "{} \t\r\n"):
            raise ConfigurationError(
                f"namespace must be a non-empty string without braces or spaces, not {namespace!r}"
            )
        self.namespace = namespace
        if encryption_key is None:
            self._aead: AESGCM | None = None
            self._name_key = _UNKEYED_NAME_KEY
            return
        secret = encryption_key.encode() if isinstance(encryption_key, str) else encryption_key
        if not isinstance(secret, bytes) or len(secret) < _MIN_KEY_BYTES:
            raise ConfigurationError(
                f"encryption_key must be at least {_MIN_KEY_BYTES} bytes (str or bytes); make one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        self._aead = AESGCM(_derive(secret, b"m2m-client shared token cache v1: AES-256-GCM"))
        # A different encryption key gives different names too: two fleets with different keys
        # in one namespace never overwrite each other's entries.
        self._name_key = _derive(secret, b"m2m-client shared token cache v1: key names")

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def names(self, key: CacheKey) -> KeyNames:
        material = json.dumps([self.namespace, *key], separators=(",", ":")).encode()
        tag = hmac.new(self._name_key, material, hashlib.sha256).hexdigest()[:32]
        base = f"{self.namespace}:{{{tag}}}"
        return KeyNames(f"{base}:token", f"{base}:lease", f"{base}:error", f"{base}:wake")

    # --- values -----------------------------------------------------------------------

    def seal(self, name: str, payload: dict[str, Any]) -> bytes:
        data = json.dumps(payload, separators=(",", ":")).encode()
        if self._aead is None:
            return bytes([PLAIN]) + data
        nonce = os.urandom(_NONCE_BYTES)
        return bytes([SEALED]) + nonce + self._aead.encrypt(nonce, data, name.encode())

    def open(self, name: str, value: bytes) -> dict[str, Any]:
        if not value:
            raise UndecodableEntry("empty value")
        if len(value) > MAX_VALUE_BYTES:
            raise UndecodableEntry(f"{len(value)} bytes, more than {MAX_VALUE_BYTES}")
        version, body = value[0], value[1:]
        if self._aead is not None:
            # Accepting a plain value when we encrypt would let anyone who can write to Redis
            # plant a token of their choosing.
            if version != SEALED or len(body) <= _NONCE_BYTES:
                raise UndecodableEntry(f"not a sealed entry (version byte {version:#04x})")
            try:
                data = self._aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], name.encode())
            except InvalidTag:
                raise UndecodableEntry("does not decrypt with this encryption_key") from None
        elif version == SEALED:
            raise UndecodableEntry("an encrypted entry, and this cache has no encryption_key")
        elif version != PLAIN:
            raise UndecodableEntry(f"unknown format (version byte {version:#04x})")
        else:
            data = body
        try:
            payload = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise UndecodableEntry("not JSON") from None
        if not isinstance(payload, dict):
            raise UndecodableEntry("not a JSON object")
        return payload

    def encode_token(self, names: KeyNames, token: AccessToken) -> bytes:
        payload = {
            "t": token.access_token,
            "y": token.token_type,
            "s": token.scope,
            "l": token.expires_at - token.issued_at,
        }
        return self.seal(names.token, payload)

    def decode_token(self, names: KeyNames, value: bytes) -> TokenEntry:
        p = self.open(names.token, value)
        access_token, token_type, scope, lifetime = p.get("t"), p.get("y"), p.get("s"), p.get("l")
        if not isinstance(access_token, str) or not access_token or not isinstance(token_type, str):
            raise UndecodableEntry("token entry without a token")
        if scope is not None and not isinstance(scope, str):
            raise UndecodableEntry("token entry with a bad scope")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise UndecodableEntry("token entry with a bad lifetime")
        return TokenEntry(access_token, token_type, scope, float(lifetime))

    def encode_error(self, names: KeyNames, error: TokenEndpointError) -> bytes:
        payload = {
            "e": error.error,
            "d": error.error_description,
            "c": error.status_code,
            "u": error.error_uri,
        }
        return self.seal(names.negative, payload)

    def decode_error(self, names: KeyNames, value: bytes) -> NegativeEntry:
        p = self.open(names.negative, value)
        error, description, status, uri = p.get("e"), p.get("d"), p.get("c"), p.get("u")
        if not isinstance(error, str) or not error:
            raise UndecodableEntry("error entry without an error code")
        if description is not None and not isinstance(description, str):
            raise UndecodableEntry("error entry with a bad description")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise UndecodableEntry("error entry with a bad status")
        if uri is not None and not isinstance(uri, str):
            raise UndecodableEntry("error entry with a bad uri")
        return NegativeEntry(error, description, status, uri)
