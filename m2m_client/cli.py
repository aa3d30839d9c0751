"""The ``m2m-client`` command: demo, issuer, token, verify, decode.

Exit codes: 0 success; 1 the token request or the verification failed; 2 usage or
configuration error. User errors print one line to stderr, never a traceback, and never a
secret (the client secret is not echoed; a token is only printed where it was asked for).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from m2m_client import __version__
from m2m_client.errors import ConfigurationError, M2MError, VerificationError

if TYPE_CHECKING:
    from m2m_client.cache import RedisTokenCache

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_EPILOG = """\
exit codes:
  0  success
  1  the token request or the verification failed (reason on stderr)
  2  usage or configuration error
"""

_TOKEN_EPILOG = (
    """\
Every flag can come from the environment instead, as for ClientCredentials.from_env():
M2M_TOKEN_URL, M2M_ISSUER, M2M_CLIENT_ID, M2M_CLIENT_SECRET, M2M_AUDIENCE, M2M_RESOURCE,
M2M_SCOPE, M2M_AUTH_METHOD, M2M_PRIVATE_KEY_FILE, M2M_CLIENT_SECRET_FILE,
M2M_CLIENT_ASSERTION_FILE, M2M_TIMEOUT, Azure workload identity's AZURE_* variables, or
Auth0's AUTH0_DOMAIN,
AUTH0_CLIENT_ID, AUTH0_CLIENT_SECRET, AUTH0_AUDIENCE. A flag wins over its variable.
Prefer M2M_CLIENT_SECRET to --client-secret: flags show in `ps` and shell history.
With M2M_REDIS_URL (and M2M_CACHE_KEY, to encrypt), the token is shared through Redis or
Valkey: runs on many hosts ask the authorization server once per token lifetime.

"""
    + _EPILOG
)

# flag destination -> the environment variable it overrides (so from_env does the parsing
# and its error messages name the setting).
_FLAG_TO_ENV = {
    "token_url": "M2M_TOKEN_URL",
    "issuer": "M2M_ISSUER",
    "client_id": "M2M_CLIENT_ID",
    "client_secret": "M2M_CLIENT_SECRET",
    "audience": "M2M_AUDIENCE",
    "resource": "M2M_RESOURCE",
    "scope": "M2M_SCOPE",
    "auth_method": "M2M_AUTH_METHOD",
    "private_key_file": "M2M_PRIVATE_KEY_FILE",
    "client_assertion_file": "M2M_CLIENT_ASSERTION_FILE",
    "timeout": "M2M_TIMEOUT",
}


class _UsageError(Exception):
    """A command-line problem: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 itself; raising lets main() return the code instead of exiting.
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def _build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="m2m-client",
        description="OAuth 2.0 client-credentials tokens for service-to-service calls.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"m2m-client {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what the client does to stderr"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="run the whole flow locally: issuer, protected API and a worker",
        description="Start a LocalIssuer and the example FastAPI service on 127.0.0.1, then "
        "run a worker that calls them with AsyncTokenClient + BearerAuth. No account needed.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--dpop",
        action="store_true",
        help="use DPoP (RFC 9449) sender-constrained tokens, and show a stolen token refused",
    )

    token = commands.add_parser(
        "token",
        help="get an access token (client credentials) and print it",
        description="Request an access token with the client-credentials grant.",
        epilog=_TOKEN_EPILOG,
        formatter_class=formatter,
    )
    token.add_argument("--token-url", help="token endpoint URL")
    token.add_argument("--issuer", help="issuer URL (token endpoint found by discovery)")
    token.add_argument("--client-id")
    token.add_argument("--client-secret", help="discouraged: use M2M_CLIENT_SECRET")
    token.add_argument("--private-key-file", help="PEM key for private_key_jwt")
    token.add_argument(
        "--client-assertion-file",
        help="a JWT someone else signs (Kubernetes projected token, Azure federated token), "
        "sent as the client assertion",
    )
    token.add_argument("--audience", help="API the token is for (sent as `audience`)")
    token.add_argument("--resource", help="RFC 8707 resource indicator")
    token.add_argument("--scope", help="space-separated scopes")
    token.add_argument(
        "--auth-method", choices=["client_secret_basic", "client_secret_post", "private_key_jwt"]
    )
    token.add_argument("--timeout", help="seconds per request (default 10)")
    token.add_argument(
        "--json",
        action="store_true",
        help="print the token response as JSON (access_token, token_type, expires_in, scope)",
    )

    verify = commands.add_parser(
        "verify",
        help="verify an access token and print its claims",
        description="Verify TOKEN (signature from the issuer's JWKS, iss, aud, exp, nbf) and "
        "print its claims as JSON; on failure print the reason and exit 1.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    verify.add_argument("token", metavar="TOKEN", help="the access token, or - to read stdin")
    verify.add_argument("--issuer", required=True, help="expected iss (JWKS by discovery)")
    verify.add_argument(
        "--audience", required=True, action="append", help="accepted aud (repeatable)"
    )
    verify.add_argument("--algorithms", default="RS256", help="comma-separated (default RS256)")
    verify.add_argument("--roles-claim", default="roles", help="claim holding roles")
    verify.add_argument("--jwks-url", help="JWKS URL, instead of discovery")
    verify.add_argument("--leeway", type=float, default=30.0, help="clock skew, seconds")

    decode = commands.add_parser(
        "decode",
        help="show a token's header and claims WITHOUT verifying it",
        description="Decode TOKEN's header and claims. NOT VERIFIED: the signature and the "
        "claims are not checked; use `verify` to decide whether to trust a token.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    decode.add_argument("token", metavar="TOKEN", help="the token, or - to read stdin")
    decode.add_argument("--json", action="store_true", help="one JSON object on stdout")

    from m2m_client._issuer_command import add_issuer_parser

    add_issuer_parser(commands)
    for command in commands.choices.values():
        # -v after the subcommand too; SUPPRESS keeps a -v given before it.
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log to stderr"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``m2m-client`` command; return its exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        _configure_logging(verbose=args.verbose)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "demo":
            from m2m_client._demo import run_demo

            return run_demo(dpop=args.dpop)
        if args.command == "issuer":
            from m2m_client._issuer_command import run_issuer

            return run_issuer(args)
        if args.command == "token":
            code = _token(args, os.environ)
        elif args.command == "verify":
            code = _verify(args)
        else:
            code = _decode(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
    except BrokenPipeError:
        # `m2m-client decode TOKEN | head -1`: the reader left; end quietly, as cat does.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigurationError as exc:
        print(f"m2m-client: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as exc:
        print(f"m2m-client: token rejected: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except M2MError as exc:
        print(f"m2m-client: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _configure_logging(*, verbose: bool) -> None:
    logger = logging.getLogger("m2m_client")
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.setLevel(logging.DEBUG)
    else:
        # The failure is reported once, as our own one-line message; without a handler
        # Python's last-resort handler would print the library's warning as well.
        handler = logging.NullHandler()
    logger.addHandler(handler)


def _read_token(value: str, stdin: TextIO | None = None) -> str:
    raw = (stdin or sys.stdin).read() if value == "-" else value
    token = raw.strip()
    if token[:7].lower() == "bearer ":
        # Accepted (the command is for diagnosis, and a pasted header value is unambiguous),
        # but said, because the library's verify() wants the bare token.
        print(
            "m2m-client: note: ignored the 'Bearer ' prefix; TOKEN (and verify() in code) "
            "takes the token alone",
            file=sys.stderr,
        )
        token = token[7:].strip()
    if not token:
        raise _UsageError("m2m-client: error: TOKEN is empty")
    return token


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from m2m_client._client import TokenClient
    from m2m_client.config import ClientCredentials

    if args.client_secret:
        print(
            "m2m-client: warning: --client-secret is visible to other users (ps) and in shell "
            "history; prefer M2M_CLIENT_SECRET",
            file=sys.stderr,
        )
    env = dict(environ)
    for dest, variable in _FLAG_TO_ENV.items():
        value = getattr(args, dest)
        if value is not None:
            env[variable] = str(value)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            credentials = ClientCredentials.from_env(env)
    except ConfigurationError as exc:
        message = str(exc)
        for dest, variable in _FLAG_TO_ENV.items():
            if getattr(args, dest) is not None:
                flag = "--" + dest.replace("_", "-")
                message = message.replace(f"environment variable {variable}", flag)
        raise ConfigurationError(message) from None
    for warning in caught:
        print(f"m2m-client: warning: {warning.message}", file=sys.stderr)
    if credentials.dpop is True:
        # The key would die with this process: the printed token, bound to it, would be
        # useless to whoever reads it (every request needs a proof signed by that key).
        raise ConfigurationError(
            "M2M_DPOP=true makes a DPoP key that dies with this command, so the token it "
            "printed could never be used; set M2M_DPOP_KEY_FILE to a PEM private key that "
            "the caller keeps instead (m2m-client token binds the token to that key)"
        )
    started = time.time()
    shared = _shared_cache(env)
    try:
        with TokenClient(credentials, shared_cache=shared) as tokens:
            token = tokens.get_token()
    finally:
        if shared is not None:
            shared.close()
    if not args.json:
        print(token.access_token)
        return EXIT_OK
    response: dict[str, Any] = {
        "access_token": token.access_token,
        "token_type": token.token_type,
        "expires_in": max(0, round(token.expires_at - started)),
        "expires_at": int(token.expires_at),
    }
    if token.scope is not None:
        response["scope"] = token.scope
    print(json.dumps(response, indent=2))
    return EXIT_OK


def _shared_cache(env: Mapping[str, str]) -> RedisTokenCache | None:
    """The fleet-shared cache named by ``M2M_REDIS_URL`` (+ ``M2M_CACHE_KEY``), if any."""
    url = env.get("M2M_REDIS_URL", "").strip()
    if not url:
        return None
    from m2m_client.cache import RedisTokenCache

    key = env.get("M2M_CACHE_KEY") or None
    if key is None:
        print(
            "m2m-client: warning: M2M_REDIS_URL without M2M_CACHE_KEY stores the token "
            "unencrypted in Redis",
            file=sys.stderr,
        )
    try:
        return RedisTokenCache.from_url(url, encryption_key=key)
    except ConfigurationError:
        raise
    except Exception as exc:  # redis-py's URL parsing raises ValueError and friends
        raise ConfigurationError(
            f"M2M_REDIS_URL is not a usable Redis URL ({type(exc).__name__})"
        ) from None


def _verify(args: argparse.Namespace) -> int:
    from m2m_client.verify import TokenVerifier

    token = _read_token(args.token)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    verifier = TokenVerifier(
        issuer=args.issuer,
        audience=args.audience,
        algorithms=algorithms,
        roles_claim=args.roles_claim,
        jwks_url=args.jwks_url,
        leeway=args.leeway,
    )
    try:
        claims = verifier.verify(token)
    except VerificationError as exc:
        mismatch = _mismatch(token, args.issuer, args.audience)
        if not mismatch:
            raise
        print(f"m2m-client: token rejected: {exc}{mismatch}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(claims.to_dict(), indent=2, sort_keys=True))
    return EXIT_OK


def _mismatch(token: str, issuer: str, audiences: Sequence[str]) -> str:
    """Expected against actual iss / aud, read from the UNVERIFIED payload (never the token)."""
    parts = token.split(".")
    try:
        claims = _b64url_json(parts[1], "payload") if len(parts) == 3 else {}
    except _DecodeError:
        return ""
    found: list[str] = []
    iss = claims.get("iss")
    if iss != issuer:
        found.append(f"expected issuer {issuer!r}, the token's iss is {iss!r}")
    aud = claims.get("aud")
    token_audiences = aud if isinstance(aud, list) else [aud]
    if not set(audiences) & {a for a in token_audiences if isinstance(a, str)}:
        wanted = audiences[0] if len(audiences) == 1 else list(audiences)
        found.append(f"expected audience {wanted!r}, the token's aud is {aud!r}")
    return f" ({'; '.join(found)}; unverified claims)" if found else ""


def _b64url_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise _DecodeError(f"the {what} is not base64url-encoded JSON") from exc
    if not isinstance(value, dict):
        raise _DecodeError(f"the {what} is not a JSON object")
    return value


class _DecodeError(M2MError):
    """The token is not a compact JWS/JWT (exit code 1)."""


def _decode(args: argparse.Namespace) -> int:
    token = _read_token(args.token)
    parts = token.split(".")
    if len(parts) == 5:
        raise _DecodeError("cannot decode: this is an encrypted token (JWE), not a signed JWT")
    if len(parts) != 3:
        raise _DecodeError("cannot decode: a JWT has three dot-separated parts")
    header = _b64url_json(parts[0], "header")
    claims = _b64url_json(parts[1], "payload")
    banner = "NOT VERIFIED: decoded without checking the signature, issuer, audience or expiry"
    if args.json:
        print(f"m2m-client: {banner}", file=sys.stderr)
        document = {"verified": False, "header": header, "claims": claims}
        print(json.dumps(document, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"# {banner}")
    print("header:", json.dumps(header, indent=2, sort_keys=True))
    print("claims:", json.dumps(claims, indent=2, sort_keys=True))
    expiry = _describe_expiry(claims.get("exp"), time.time())
    if expiry:
        print(expiry)
    return EXIT_OK


def _describe_expiry(exp: object, now: float) -> str | None:
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
    delta = int(exp - now)
    if delta >= 0:
        return f"# expires {when} (in {delta} s)"
    return f"# expired {when} ({-delta} s ago)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
