"""A projected service-account token file that rotates like the kubelet's (issue 21)."""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt

from m2m_client.errors import ConfigurationError

__all__ = ["ProjectedTokenFile"]


class ProjectedTokenFile:
    """A JWT in a file, rewritten the way the kubelet rewrites a projected token.

    The kubelet's atomic writer puts each version in a new timestamped directory, points the
    ``..data`` symlink at it with one ``rename``, and the file (``path``) is a symlink through
    ``..data``: a reader sees the old token or the new one, never half of one. :meth:`rotate`
    does the same (new ``iat``, ``exp``, ``jti``); :meth:`start` rotates in the background at
    80 % of each token's life, as the kubelet does. Signed with ``private_key`` (a
    cryptography private key; by default a fresh RSA key, see :attr:`public_jwk`), or by
    ``signer``, a :class:`LocalIssuer` standing in for the cluster's issuer (then
    ``issuer`` should be its ``url``).

    Usage: ``with ProjectedTokenFile(issuer=..., subject=..., audience=...) as projected:``
    then ``ClientCredentials(..., client_assertion=projected.path)``.
    """

    def __init__(
        self,
        *,
        issuer: str,
        subject: str,
        audience: str,
        directory: str | os.PathLike[str] | None = None,
        lifetime: int = 600,
        private_key: Any = None,
        kid: str | None = None,
        algorithm: str = "RS256",
        extra_claims: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        signer: Any = None,
    ) -> None:
        if lifetime < 2:
            raise ConfigurationError("ProjectedTokenFile lifetime must be at least 2 seconds")
        self.signer = signer
        if private_key is None and signer is None:
            from cryptography.hazmat.primitives.asymmetric import rsa

            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issuer, self.subject, self.audience = issuer, subject, audience
        self.lifetime, self.kid, self.algorithm = lifetime, kid or secrets.token_hex(8), algorithm
        self.private_key = private_key
        self.extra_claims = dict(extra_claims or {})
        self.clock = clock
        self._owned = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="m2m-projected-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "token"
        """The file to give as ``client_assertion`` (a symlink through ``..data``)."""
        self.rotations = 0
        self.token = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.rotate()

    def __repr__(self) -> str:
        return f"<ProjectedTokenFile {str(self.path)!r} rotations={self.rotations}>"

    @property
    def public_jwk(self) -> dict[str, Any]:
        """The verification key as a JWK (with ``kid``, ``alg``): what a JWKS would list."""
        key, kid, algorithm = self._key()
        jwk: dict[str, Any] = jwt.get_algorithm_by_name(algorithm).to_jwk(
            key.public_key(), as_dict=True
        )
        return {**jwk, "kid": kid, "alg": algorithm, "use": "sig"}

    def _key(self) -> tuple[Any, str, str]:
        signer = self.signer
        if signer is not None:  # a LocalIssuer: its current signing key
            return signer.private_key, str(signer.kid), str(signer.algorithm)
        return self.private_key, self.kid, self.algorithm

    def mint(self) -> str:
        """A new token (not written)."""
        now = int(self.clock())
        claims = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(16),
            **self.extra_claims,
        }
        key, kid, algorithm = self._key()
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})

    def rotate(self) -> str:
        """Write a new token with the kubelet's atomic symlink swap; return it."""
        with self._lock:
            token = self.mint()
            self.rotations += 1
            version = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self.rotations}"
            (self.directory / version).mkdir()
            (self.directory / version / "token").write_text(token, encoding="ascii")
            staging = self.directory / "..data_tmp"
            staging.unlink(missing_ok=True)
            staging.symlink_to(version)
            old = (self.directory / "..data").resolve() if self.rotations > 1 else None
            os.replace(staging, self.directory / "..data")  # the atomic swap
            if not self.path.is_symlink():
                self.path.symlink_to(Path("..data") / "token")
            if old is not None and old.is_dir():
                (old / "token").unlink(missing_ok=True)
                old.rmdir()
            self.token = token
            return token

    def start(self) -> ProjectedTokenFile:
        """Rotate in a background thread at 80 % of each token's life, until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="projected-token")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.lifetime * 0.8):
            self.rotate()

    def stop(self) -> None:
        """Stop background rotation (waits at most 5 s for the thread)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> ProjectedTokenFile:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
