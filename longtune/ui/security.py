"""The UI's guard: who may talk to it, and from where.

Every request passes :func:`check_request` before any route runs:

1. ``Host`` must name this machine (``localhost``, its host name, or an IP literal): a page
   served from another domain that re-points its DNS name at 127.0.0.1 (DNS rebinding) sends
   its own name and is refused (403).
2. Everything but ``/login`` needs the access token: the cookie set by ``/login?token=...``
   (HttpOnly, SameSite=Strict) or an ``Authorization: Bearer`` header (401 without).
3. A state-changing request (anything but GET/HEAD) must come from this origin (``Origin``
   equal to the ``Host``, ``Sec-Fetch-Site`` same-origin when the browser sends them) and carry
   JSON, which a cross-site form cannot send (403 / 415).

No CORS headers are ever sent, so other origins cannot read any answer.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SAFE_METHODS = ("GET", "HEAD")
LOGIN_PATH = "/login"


@dataclass
class Settings:
    """What one UI server was started with."""

    runs_dir: Path
    allow_dirs: list[Path]
    port: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    host_names: tuple[str, ...] = ()
    """Extra names ``Host`` may carry (besides localhost, this host's name and IP literals)."""

    @property
    def cookie(self) -> str:
        """The cookie's name (per port: cookies are shared by every port of a host)."""
        return f"longtune_ui_{self.port}"


def host_name(host_header: str) -> str:
    """The name or address in a ``Host`` header, without the port, lower case.

    Args:
        host_header: e.g. ``127.0.0.1:8600``, ``[::1]:8600``, ``localhost``.

    Returns:
        ``127.0.0.1``, ``::1``, ``localhost``.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str, settings: Settings) -> bool:
    """Whether a ``Host`` header names this machine (not a rebound foreign name).

    Args:
        host_header: the request's ``Host``.
        settings: the server's settings.

    Returns:
        True for ``localhost``, this host's name, names given at start, and IP literals.
    """
    name = host_name(host_header)
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    own = {"localhost", socket.gethostname().lower(), *(h.lower() for h in settings.host_names)}
    return name in own


def has_token(headers: dict[str, str], cookies: dict[str, str], settings: Settings) -> bool:
    """Whether the request carries the access token (cookie or bearer header).

    Args:
        headers: the request headers (lower-case names).
        cookies: the request cookies.
        settings: the server's settings.

    Returns:
        True when the token matches (compared in constant time).
    """
    given = cookies.get(settings.cookie, "")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return bool(given) and secrets.compare_digest(given.encode(), settings.token.encode())


def cross_origin(headers: dict[str, str]) -> str | None:
    """Why a state-changing request is not from this origin, or None when it is.

    Args:
        headers: the request headers (lower-case names).

    Returns:
        The reason, or None.
    """
    origin = headers.get("origin")
    if origin is not None:
        netloc = urlsplit(origin).netloc.lower()
        if netloc != headers.get("host", "").strip().lower():
            return f"cross-origin request from {origin!r} refused"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    return None


def check_request(
    method: str, path: str, headers: dict[str, str], cookies: dict[str, str], settings: Settings
) -> tuple[int, str] | None:
    """The guard: an HTTP status and reason to refuse the request with, or None to let it in.

    Args:
        method: the HTTP method.
        path: the URL path.
        headers: the request headers (lower-case names).
        cookies: the request cookies.
        settings: the server's settings.

    Returns:
        ``(status, reason)`` or None.
    """
    if not host_allowed(headers.get("host", ""), settings):
        return 403, f"Host {headers.get('host', '')!r} is not this machine (DNS rebinding?)"
    if path == LOGIN_PATH and method in SAFE_METHODS:
        return None
    if not has_token(headers, cookies, settings):
        return 401, "open the login link that `longtune ui` printed (the access token is missing)"
    if method not in SAFE_METHODS:
        reason = cross_origin(headers)
        if reason is not None:
            return 403, reason
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return 415, "send JSON (Content-Type: application/json)"
    return None


SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
