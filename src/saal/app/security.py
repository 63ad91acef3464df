"""Who may use the server, and what another site cannot make a visitor's browser do.

* The server listens on 127.0.0.1 by default. On any address but ``127.0.0.1``, ``localhost`` and ``::1`` (other
  loopback addresses such as ``127.0.0.2`` included) it requires an access token on every request (``?token=`` once,
  which sets a cookie, or ``Authorization: Bearer TOKEN``). On a loopback address it accepts only loopback ``Host``
  headers, so a web page cannot reach it through DNS rebinding.
* An annotator is a name kept in a signed, ``HttpOnly``, ``SameSite=Strict`` cookie (percent-encoded, so any
  letters fit in it): a request started by another site carries no identity.
* Secrets are compared as UTF-8 bytes with :func:`hmac.compare_digest`, so a wrong token, cookie or CSRF field with
  any characters is refused (401 / 403), never an error.
* Every request that changes something is a POST that carries a CSRF token (an HMAC of the session under the
  project's secret, which another site cannot read or compute) and whose ``Origin`` (when sent) is this server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from urllib.parse import quote, unquote

from saal.errors import SaalError

SESSION_COOKIE = "saal_annotator"
TOKEN_COOKIE = "saal_token"
_NAME = re.compile(r"^[\w .@-]{1,40}$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
TOKEN_FREE_HOSTS = frozenset(LOOPBACK_NAMES)
_TOKEN = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")


def needs_token(host: str) -> bool:
    """Return whether a server listening on ``host`` requires the access token: on any address but 127.0.0.1,
    localhost and ::1 (another loopback address such as 127.0.0.2 needs it too, as the README says)."""
    return host not in TOKEN_FREE_HOSTS


def check_token(token: str) -> str:
    """Return ``--token`` when it can travel in a URL and a cookie unchanged.

    Raises:
        SaalError: an empty token, or one with characters other than ASCII letters, digits and ``. _ ~ -``.
    """
    if not _TOKEN.match(token):
        raise SaalError(
            "--token must be 1-200 ASCII letters, digits or . _ ~ - (it goes into a URL and a cookie); "
            "leave it out for a random one"
        )
    return token


def same_secret(given: str | None, expected: str) -> bool:
    """Return whether ``given`` equals ``expected``, in constant time, for text with any characters."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def is_loopback(host: str) -> bool:
    """Return whether ``host`` (a name or an address) is this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_name(name: str) -> str:
    """Return the annotator name, stripped.

    Raises:
        SaalError: an empty name, or one of more than 40 characters or with characters other than letters,
            digits, space and ``. @ - _``.
    """
    name = name.strip()
    if not _NAME.match(name):
        raise SaalError("give a name of 1-40 letters, digits, spaces or . @ - _")
    return name


class Signer:
    """Signs annotator sessions and derives their CSRF tokens from the project's secret.

    Args:
        secret: the project's secret (``FOLDER/.saal-label/secret``).
    """

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()[:32]

    def session(self, name: str) -> str:
        """Return the cookie value that names ``name`` (the name percent-encoded: a cookie holds ASCII only)."""
        return f"{quote(name, safe='')}|{self._mac('session', name)}"

    def annotator(self, cookie: str | None) -> str | None:
        """Return the name in a session cookie, or None when there is none or its signature is wrong."""
        if not cookie or "|" not in cookie:
            return None
        encoded, mac = cookie.rsplit("|", 1)
        try:
            name = unquote(encoded, errors="strict")
        except UnicodeDecodeError:  # not a cookie this server wrote
            return None
        return name if same_secret(mac, self._mac("session", name)) else None

    def csrf(self, name: str) -> str:
        """Return the CSRF token of ``name``'s session."""
        return self._mac("csrf", name)

    def check_csrf(self, name: str, token: str | None) -> bool:
        """Return whether ``token`` is ``name``'s CSRF token."""
        return same_secret(token, self.csrf(name))


def same_origin(origin: str | None, host: str | None) -> bool:
    """Return whether a request's ``Origin`` header (when it has one) names the server it was sent to."""
    if origin is None:
        return True
    if origin == "null" or host is None:
        return False
    return origin.split("://", 1)[-1].rstrip("/") == host


def host_allowed(host_header: str | None) -> bool:
    """Return whether a request's ``Host`` header names a loopback address (DNS-rebinding protection)."""
    if not host_header:
        return False
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(name)
