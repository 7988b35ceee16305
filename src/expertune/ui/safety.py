"""The UI's rules of safety: paths stay inside the workspace, other addresses need a token, actions need the
page's CSRF token, and only loopback Host names are answered on a loopback bind (no DNS rebinding)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from expertune.errors import ConfigError


class Refused(Exception):
    """A request the UI will not serve: `status` (400, 403, 404) and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def inside(workspace: Path, relative: str) -> Path:
    """The real path of `relative` under `workspace`; Refused(403) when it (or a link it follows) leads outside,
    Refused(400) for an absolute or empty path."""
    if not relative or "\x00" in relative:
        raise Refused(400, "a path is required")
    if relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise Refused(403, f"{relative}: absolute paths are refused; give a path inside the workspace")
    root = workspace.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise Refused(403, f"{relative}: outside the workspace")
    return target


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Guard:
    """What a request must carry: `token` (None on a loopback bind) and the CSRF token of every POST."""

    host: str
    port: int
    token: str | None = None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @classmethod
    def for_address(cls, host: str, port: int) -> Guard:
        if not host:
            raise ConfigError("ui: --host is empty; use 127.0.0.1 (the default) or an address of this machine")
        return cls(host, port, None if is_loopback(host) else secrets.token_urlsafe(24))

    def check_host(self, header: str | None) -> None:
        """On a loopback bind only loopback Host names are answered (a web page elsewhere cannot rebind a name
        to 127.0.0.1 and read the UI)."""
        if self.token is not None:
            return
        name = (header or "").rsplit(":", 1)[0].strip("[]") if header else ""
        if not is_loopback(name):
            raise Refused(403, f"Host {header!r} is not a loopback name; open http://127.0.0.1:{self.port}/")

    def check_token(self, cookie_token: str | None, query_token: str | None) -> bool:
        """True when no token is needed or one matches; the query form is how the printed URL brings it."""
        if self.token is None:
            return True
        return any(t is not None and hmac.compare_digest(t, self.token) for t in (cookie_token, query_token))

    def check_csrf(self, header: str | None) -> None:
        if header is None or not hmac.compare_digest(header, self.csrf):
            raise Refused(403, "missing or wrong X-CSRF-Token: reload the page")
