"""Who may use the server, and what another site cannot make a visitor's browser do.

* The server listens on 127.0.0.1 by default. On any other address it requires an access token on every request
  (``?token=`` once, which sets a cookie, or ``Authorization: Bearer TOKEN``). On a loopback address it accepts
  only loopback ``Host`` headers, so a web page cannot reach it through DNS rebinding.
* An annotator is a name kept in a signed, ``HttpOnly``, ``SameSite=Strict`` cookie: a request started by another
  site carries no identity.
* Every request that changes something is a POST that carries a CSRF token (an HMAC of the session under the
  project's secret, which another site cannot read or compute) and whose ``Origin`` (when sent) is this server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

from saal.errors import SaalError

SESSION_COOKIE = "saal_annotator"
TOKEN_COOKIE = "saal_token"
_NAME = re.compile(r"^[\w .@-]{1,40}$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


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
        """Return the cookie value that names ``name``."""
        return f"{name}|{self._mac('session', name)}"

    def annotator(self, cookie: str | None) -> str | None:
        """Return the name in a session cookie, or None when there is none or its signature is wrong."""
        if not cookie or "|" not in cookie:
            return None
        name, mac = cookie.rsplit("|", 1)
        return name if hmac.compare_digest(mac, self._mac("session", name)) else None

    def csrf(self, name: str) -> str:
        """Return the CSRF token of ``name``'s session."""
        return self._mac("csrf", name)

    def check_csrf(self, name: str, token: str | None) -> bool:
        """Return whether ``token`` is ``name``'s CSRF token."""
        return bool(token) and hmac.compare_digest(str(token), self.csrf(name))


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
