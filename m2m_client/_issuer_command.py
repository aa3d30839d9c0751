"""``m2m-client issuer``: run a LocalIssuer in the foreground until Ctrl-C or SIGTERM.

A development tool: it prints each client's ``M2M_*`` settings, secret included, because
pasting them into a worker's environment is the point of the command.
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from m2m_client.errors import ConfigurationError

if TYPE_CHECKING:
    from m2m_client.testing import LocalIssuer

__all__ = ["add_issuer_parser", "run_issuer"]


def add_issuer_parser(commands: Any) -> None:
    """Add the ``issuer`` subcommand to the parser's subcommands (``add_subparsers()``)."""
    issuer = commands.add_parser(
        "issuer",
        help="run a local authorization server (LocalIssuer) until Ctrl-C",
        description="Run LocalIssuer on 127.0.0.1 in the foreground: discovery, JWKS and a "
        "client-credentials token endpoint, for development and tests (never production). "
        "Prints its URLs and each client's M2M_* settings; stops on Ctrl-C or SIGTERM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    issuer.add_argument("--port", type=int, default=9011, help="port on 127.0.0.1 (default 9011)")
    issuer.add_argument(
        "--client",
        action="append",
        metavar="ID[:SECRET]",
        help="register a client (repeatable); without :SECRET one is generated",
    )
    issuer.add_argument("--audience", default="https://api.example.com", help="the API (aud)")
    issuer.add_argument(
        "--permissions",
        default="",
        help="granted to every client without its own --grant ...:permissions= "
        "(scopes and Auth0 permissions)",
    )
    issuer.add_argument(
        "--roles", default="", help="roles of every client without its own --grant ...:roles="
    )
    issuer.add_argument(
        "--grant",
        action="append",
        metavar="ID:permissions=A,B|ID:roles=A,B",
        help="per-client grant (repeatable), replacing --permissions or --roles for that "
        "client; empty after = grants nothing, e.g. --grant viewer:roles=",
    )
    issuer.add_argument(
        "--roles-claim", help="claim holding roles (default <audience>/roles; dotted nests)"
    )
    issuer.add_argument(
        "--trust",
        action="append",
        metavar="ISSUER_URL:SUBJECT=CLIENT_ID",
        help="federated client authentication (repeatable): a client assertion ISSUER_URL "
        "signs (JWKS by discovery) for SUBJECT, with aud this issuer, authenticates as "
        "CLIENT_ID; add --client CLIENT_ID to grant it permissions",
    )
    issuer.add_argument("--algorithm", choices=["RS256", "ES256"], default="RS256")
    issuer.add_argument("--token-lifetime", type=int, default=3600, help="seconds (default 3600)")


def _names(value: str) -> list[str]:
    return [name for name in value.replace(",", " ").split() if name]


def _clients(specs: list[str] | None) -> list[tuple[str, str]]:
    clients = []
    for spec in specs or ["worker"]:
        client_id, _, secret = spec.partition(":")
        if not client_id:
            raise ConfigurationError(f"--client {spec!r}: the client id is empty (ID[:SECRET])")
        clients.append((client_id, secret or secrets.token_urlsafe(24)))
    return clients


_GRANT_KINDS = ("permissions", "roles")


def _grants(specs: list[str] | None, client_ids: list[str]) -> dict[tuple[str, str], list[str]]:
    """``--grant ID:KIND=A,B`` -> {(ID, KIND): [A, B]}; several grants of one kind add up."""
    grants: dict[tuple[str, str], list[str]] = {}
    for spec in specs or []:
        client_id, _, grant = spec.partition(":")
        kind, equals, value = grant.partition("=")
        if not equals or kind not in _GRANT_KINDS:
            raise ConfigurationError(f"--grant {spec!r}: write ID:permissions=A,B or ID:roles=A,B")
        if client_id not in client_ids:
            known = ", ".join(client_ids)
            raise ConfigurationError(
                f"--grant {spec!r}: no client {client_id!r} (add --client {client_id}; "
                f"clients: {known})"
            )
        grants.setdefault((client_id, kind), []).extend(_names(value))
    return grants


def run_issuer(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Serve until SIGINT or SIGTERM; return the exit code (0 when stopped by a signal)."""
    from m2m_client.testing import LocalIssuer
    from m2m_client.testing._clients import parse_trust

    out = out or sys.stdout
    if not 0 < args.port < 65536:
        raise ConfigurationError(f"--port must be between 1 and 65535, not {args.port}")
    if args.token_lifetime <= 0:
        raise ConfigurationError("--token-lifetime must be a positive number of seconds")
    issuer = LocalIssuer(
        args.algorithm,
        url=f"http://127.0.0.1:{args.port}/",
        audience=args.audience,
        roles_claim=args.roles_claim,
        token_lifetime=args.token_lifetime,
    )
    permissions, roles = _names(args.permissions), _names(args.roles)
    clients = _clients(args.client)
    grants = _grants(args.grant, [client_id for client_id, _ in clients])
    granted: dict[str, tuple[list[str], list[str]]] = {}
    for client_id, secret in clients:
        own_permissions = grants.get((client_id, "permissions"), permissions)
        own_roles = grants.get((client_id, "roles"), roles)
        granted[client_id] = (own_permissions, own_roles)
        issuer.add_client(client_id, secret, scope=own_permissions, roles=own_roles)
    for spec in args.trust or []:
        trusted_issuer, subject, client_id = parse_trust(spec)
        issuer.add_trust(trusted_issuer, subject, client_id)
    stop = threading.Event()
    with _stop_on_signals(stop), issuer:
        _print_settings(issuer, clients, granted, out)
        while not stop.wait(0.5):  # a timeout keeps the main thread responsive to signals
            pass
    print("m2m-client issuer: stopped", file=out, flush=True)
    return 0


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _print_settings(
    issuer: LocalIssuer,
    clients: list[tuple[str, str]],
    granted: dict[str, tuple[list[str], list[str]]],
    out: TextIO,
) -> None:
    q = shlex.quote
    lines = [
        "m2m-client issuer: LocalIssuer for development and tests (never production)",
        f"  issuer     {issuer.url}",
        f"  discovery  {issuer.discovery_url}",
        f"  token URL  {issuer.token_url}",
        f"  JWKS       {issuer.jwks_url}",
        f"  tokens     {issuer.algorithm}, aud {issuer.audience}, roles in "
        f"{issuer.roles_claim!r}, {issuer.token_lifetime} s",
        "",
    ]
    for client_id, secret in clients:
        permissions, roles = granted[client_id]
        lines += [
            f"# client {client_id!r}: permissions {permissions or 'none'}, roles {roles or 'none'}",
            f"export M2M_ISSUER={q(issuer.url)}",
            f"export M2M_CLIENT_ID={q(client_id)}",
            f"export M2M_CLIENT_SECRET={q(secret)}",
            f"export M2M_AUDIENCE={q(issuer.audience)}",
            "",
        ]
    lines += [
        "# the API verifies with:",
        f"#   AsyncTokenVerifier(issuer={issuer.url!r}, audience={issuer.audience!r},",
        f"#                      algorithms=[{issuer.algorithm!r}], "
        f"roles_claim={issuer.roles_claim!r})",
        "",
        "Serving; Ctrl-C (or SIGTERM) stops.",
    ]
    print("\n".join(lines), file=out, flush=True)
