"""Talking to tor's control port: replies, problems and authentication errors."""

from __future__ import annotations

from typing import NamedTuple

import stem
import stem.connection
import stem.control
import stem.response

from onionpost.core.errors import (
    TorAuthError,
)
from onionpost.net.tor.process import _safe


class _Reply(NamedTuple):
    ok: bool
    code: str
    message: str
    service_id: str | None


class _Problem(NamedTuple):
    words: str
    action: str  # "restart" | "reconnect" | "republish"


def _auth_error(exc: Exception, where: str) -> TorAuthError:  # noqa: PLR0911
    conn = stem.connection
    if isinstance(exc, conn.IncorrectPassword):
        return TorAuthError(f"{where} rejected the control password (tor.control_password).")
    if isinstance(exc, conn.PasswordAuthRejected):
        return TorAuthError(
            f"{where} does not accept a password; remove tor.control_password to use its cookie."
        )
    if isinstance(exc, conn.MissingPassword):
        return TorAuthError(
            f"{where} requires a password: set tor.control_password in onionpost.toml."
        )
    if isinstance(exc, conn.UnreadableCookieFile):
        return TorAuthError(
            f"onionpost cannot read the authentication cookie {exc.cookie_path} of {where}: "
            "add this user to the group that owns it (Debian: `sudo adduser onionpost "
            "debian-tor`) and set CookieAuthFileGroupReadable 1 (see torrc.example)."
        )
    if isinstance(exc, conn.CookieAuthFailed):
        return TorAuthError(f"{where} rejected the authentication cookie.")
    if isinstance(exc, conn.MissingAuthInfo | conn.UnrecognizedAuthMethods):
        return TorAuthError(
            f"{where} offers no login onionpost can use: set CookieAuthentication 1 in its "
            "torrc (see torrc.example)."
        )
    return TorAuthError(f"{where} refused onionpost's login: {_safe(exc)}")
