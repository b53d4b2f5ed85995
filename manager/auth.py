"""Who may call the manager: the one owner of the token check, for the routes and the page.

With no token set, every request. Otherwise `Authorization: Bearer <token>`, or, for a
GET/HEAD of the live page and the read-only routes it fetches, the page's session cookie:
`/?token=T` once is exchanged for a cookie whose value is an HMAC of the token under a key
drawn at start (so the cookie is never the token, and a restart logs every browser out).
Every secret is compared with hmac.compare_digest: the time taken says nothing of how much
of a guess was right.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

COOKIE = "bcmanager_session"
# GET/HEAD of these paths accept the page's cookie in place of the bearer token.
COOKIE_ROUTES = frozenset({"/", "/status", "/files", "/live", "/runs"})


class TokenAuth:
    """The token, the bearer header it expects and the page's session cookie value."""

    def __init__(self, token: str = ""):
        self.required = bool(token)
        self._token = token.encode()
        self._bearer = f"Bearer {token}".encode()
        self.session = hmac.new(secrets.token_bytes(32), self._token,
                                hashlib.sha256).hexdigest() if token else ""

    def authorizes(self, environ: dict) -> bool:
        """No token set; the bearer token; or the session cookie on a read-only page route."""
        if not self.required:
            return True
        return self._bearer_valid(environ) or (_cookie_route(environ)
                                               and self._cookie_valid(environ))

    def token_valid(self, given: str) -> bool:
        """The token itself, as the page's log-in `/?token=` gives it."""
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    def _bearer_valid(self, environ: dict) -> bool:
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._bearer)

    def _cookie_valid(self, environ: dict) -> bool:
        """Split by hand: http.cookies drops the rest of a header at the first cookie (of
        another site on this host) that it finds malformed."""
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name != COOKIE:
                continue
            if hmac.compare_digest(value.encode("utf-8", "replace"), self.session.encode()):
                return True
        return False


def _cookie_route(environ: dict) -> bool:
    path = environ.get("PATH_INFO") or "/"
    path = path.rstrip("/") if len(path) > 1 else path
    return environ.get("REQUEST_METHOD") in ("GET", "HEAD") and path in COOKIE_ROUTES
