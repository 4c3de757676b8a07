"""What mail clients read when something fails: onionpost errors as IMAP (and SMTP) replies.

Every :class:`~onionpost.core.errors.OnionpostError` that reaches a mail client is worded here and
nowhere else, so the same problem reads the same way in every command.  The sentence is the
error's own (its class docstring, or the more specific text it was raised with); this module
only picks the protocol's machine-readable code and makes the text safe to put on one
protocol line.  It imports no server library: ``gateway/imap.py`` turns an
:class:`ImapReply` into a pymap response, and the SMTP server does the same with its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onionpost.core.errors import (
    AddressError,
    AuthenticationFailed,
    DiskFull,
    FolderExists,
    FolderNotFound,
    FolderProtected,
    InvalidFolderName,
    MessageTooLarge,
    OnionpostError,
    PasswordRejected,
    QuotaExceeded,
    SenderNotAllowed,
    UnknownLocalUser,
)

__all__ = ["AUTH_FAILED", "ImapReply", "imap_reply", "one_line", "unexpected_imap_reply"]

_UNSAFE = re.compile(r"[^\x20-\x7e]+")
_MAX_TEXT = 400


@dataclass(frozen=True)
class ImapReply:
    """A tagged ``NO``: an RFC 5530 response code (or None) and one line of ASCII text."""

    code: str | None
    text: str


def one_line(text: str) -> str:
    """Printable ASCII on a single line, short enough for any client's status bar."""
    flat = _UNSAFE.sub(" ", text).strip() or "The request failed."
    return flat if len(flat) <= _MAX_TEXT else flat[: _MAX_TEXT - 3] + "..."


#: Said for every failed login, whether the user exists or not.
AUTH_FAILED = ImapReply(
    "AUTHENTICATIONFAILED",
    one_line(AuthenticationFailed.summary() + " Use the gateway password of this device."),
)

# Most specific class first: the first match wins.
_IMAP_CODES: tuple[tuple[type[OnionpostError], str | None], ...] = (
    (FolderNotFound, "NONEXISTENT"),
    (FolderExists, "ALREADYEXISTS"),
    (FolderProtected, "CANNOT"),
    (InvalidFolderName, "CANNOT"),
    (QuotaExceeded, "OVERQUOTA"),
    (MessageTooLarge, "TOOBIG"),
    (PasswordRejected, "CANNOT"),
)


def imap_reply(exc: OnionpostError) -> ImapReply:
    """How an onionpost error reads as the ``NO`` of an IMAP command."""
    if isinstance(exc, AuthenticationFailed | UnknownLocalUser):
        return AUTH_FAILED  # never tell a client which of user or password was wrong
    for kind, code in _IMAP_CODES:
        if isinstance(exc, kind):
            return ImapReply(code, one_line(str(exc)))
    if exc.temporary:
        return ImapReply("UNAVAILABLE", one_line(f"{exc} Try again in a moment."))
    return ImapReply(None, one_line(str(exc)))


def unexpected_imap_reply() -> ImapReply:
    """For a bug: the session goes on, and the details are in the gateway's log."""
    return ImapReply(
        "SERVERBUG",
        "The gateway hit an internal error on this command; the session continues. "
        "Details are in the onionpost log.",
    )


# --- SMTP ------------------------------------------------------------------------------------
#
# An SMTP reply is one line: a basic code (RFC 5321), an enhanced code (RFC 3463) and a
# sentence.  The basic code says what the client should do (try again later: 4xx; give up:
# 5xx; which step failed), so it is chosen from the error's type; the enhanced code is the
# error's own.  aiosmtpd words its protocol-level refusals itself ("503 Error: need RCPT
# command"), without enhanced codes; :func:`smtp_protocol_reply` rewords those too, so that
# every refusal a client can show its user has a code and a sentence from this section.

#: Said for every failed AUTH, whether the user exists or not.
SMTP_AUTH_FAILED = "535 5.7.8 " + one_line(
    AuthenticationFailed.summary() + " Use the gateway password of this device."
)
SMTP_AUTH_OK = "235 2.7.0 Authentication successful."
SMTP_SENDER_OK = "250 2.1.0 Sender OK."
SMTP_RECIPIENT_OK = "250 2.1.5 Recipient OK."
SMTP_TLS_ACTIVE = "503 5.5.1 TLS is already active on this connection."
SMTP_INTERNAL_ERROR = (
    "451 4.3.0 The gateway hit an internal error, so this was not done (no message was "
    "accepted). Try again; details are in the onionpost log."
)
SMTP_BAD_PLAIN = (
    "501 5.5.2 AUTH PLAIN data must be: authorization id, NUL, user name, NUL, password."
)
SMTP_AUTH_TOO_LONG = "501 5.5.2 The AUTH answer is too long."
SMTP_BUSY = "421 4.7.0 Too many open connections to the gateway; try again in a moment."


def smtp_queued(submission_id: int) -> str:
    """The only 250 that ends DATA: the message is durably queued and filed in Sent."""
    return f"250 2.0.0 Ok: queued as {submission_id}"


def smtp_too_many_recipients(limit: int) -> str:
    """RFC 5321 §4.5.3.1.10: 452 tells the client to send the remaining recipients later."""
    return f"452 4.5.3 Too many recipients: at most {limit} per message. Send the rest separately."


def smtp_idle_timeout(seconds: float) -> str:
    return f"421 4.4.2 Closing the connection: nothing arrived for {seconds:g} seconds."


# Most specific class first: the first match wins.  Codes not listed follow ``temporary``.
_SMTP_BASIC: tuple[tuple[type[OnionpostError], int], ...] = (
    (AuthenticationFailed, 535),
    (UnknownLocalUser, 550),
    (SenderNotAllowed, 550),
    (AddressError, 550),
    (MessageTooLarge, 552),
    (QuotaExceeded, 452),
    (DiskFull, 452),  # RFC 5321 "insufficient system storage"
)


def smtp_reply(exc: OnionpostError) -> str:
    """How an onionpost error reads as an SMTP reply line."""
    basic = next((code for kind, code in _SMTP_BASIC if isinstance(exc, kind)), None)
    if basic is None:
        basic = 451 if exc.temporary else 554
    enhanced = exc.code if _ENHANCED.fullmatch(exc.code) else exc.enhanced_code
    # The class digit of both codes must agree, or clients disagree on whether to retry.
    enhanced = f"{str(basic)[0]}{enhanced[1:]}"
    return f"{basic} {enhanced} {one_line(str(exc))}"


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_ADDRESS_FORM = "local@<56-character v3 onion>.onion"
_SMTP_STOCK: dict[str, str] = {
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "454 TLS not available": "454 4.7.0 TLS is not available on this gateway.",
    "500 Error: bad syntax": "500 5.5.2 Syntax error: the command line is empty or unreadable.",
    "500 Command line too long": "500 5.5.2 The command line is too long.",
    "500 Error: strict ASCII mode": (
        "500 5.5.2 Commands must be plain ASCII; onionpost addresses are ASCII."
    ),
    "530 Must issue a STARTTLS command first": "530 5.7.0 Send STARTTLS first.",
    "554 Command refused due to lack of security": (
        "554 5.7.0 The TLS handshake was refused; only QUIT is possible now."
    ),
    "503 Error: send HELO first": "503 5.5.1 Send EHLO first.",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first.",
    "500 Error: command 'AUTH' not recognized": "503 5.5.1 AUTH needs EHLO, not HELO.",
    "530 5.7.0 Authentication required": (
        "530 5.7.0 Authentication required: log in (AUTH PLAIN or AUTH LOGIN) with your "
        "gateway user name and password first."
    ),
    "538 5.7.11 Encryption required for requested authentication mechanism": (
        "538 5.7.11 Encryption required: this gateway is set to require TLS, so send STARTTLS "
        "before AUTH."
    ),
    "503 Already authenticated": "503 5.5.1 Already authenticated on this connection.",
    "501 Not enough value": "501 5.5.4 Say which mechanism: AUTH PLAIN or AUTH LOGIN.",
    "501 Too many values": "501 5.5.4 AUTH takes a mechanism and at most one more argument.",
    "504 5.5.4 Unrecognized authentication type": (
        "504 5.5.4 Unknown authentication mechanism; use PLAIN or LOGIN."
    ),
    "501 5.7.0 Auth aborted": "501 5.7.0 Authentication cancelled.",
    "501 5.5.2 Can't decode base64": "501 5.5.2 The AUTH data is not valid base64.",
    "503 Error: nested MAIL command": (
        "503 5.5.1 A message is already under way; send RSET to start over."
    ),
    "503 Error: need MAIL command": "503 5.5.1 Send MAIL FROM before RCPT TO.",
    "503 Error: need RCPT command": "503 5.5.1 Send at least one accepted RCPT TO before DATA.",
    "553 5.1.3 Error: malformed address": (
        f"550 5.1.3 That address cannot be read; write it as <{_ADDRESS_FORM}>."
    ),
    "501 Error: BODY can only be one of 7BIT, 8BITMIME": (
        "501 5.5.4 BODY must be 7BIT or 8BITMIME."
    ),
    "501 Error: SMTPUTF8 takes no arguments": "501 5.5.4 SMTPUTF8 takes no value.",
    "501 Error: SMTPUTF8 disabled": (
        "555 5.5.4 SMTPUTF8 is not offered: onionpost addresses are plain ASCII."
    ),
    "555 MAIL FROM parameters not recognized or not implemented": (
        "555 5.5.4 Unknown MAIL FROM parameter; this gateway knows SIZE and BODY."
    ),
    "555 RCPT TO parameters not recognized or not implemented": (
        "555 5.5.4 RCPT TO takes no parameters here."
    ),
    "502 5.5.1 Too many unrecognized commands, goodbye.": (
        "502 5.5.1 Too many unknown commands; closing the connection."
    ),
    "502 EXPN not implemented": "502 5.5.1 EXPN is not supported.",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.5.0 Addresses are not verified here; the recipient's inbox decides on delivery."
    ),
}
_SMTP_STOCK_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Never echo an unknown command: a client that pipelined an AUTH answer into a refused
    # AUTH would otherwise see its password (as base64) come back, and so would any log.
    (re.compile(r'500 Error: command ".*" not recognized'), "500 5.5.1 Unknown command."),
    (re.compile(r"501 Syntax: (.*)"), r"501 5.5.4 Syntax: \1"),
    (re.compile(r"502 Could not VRFY .*"), f"501 5.1.3 Write the address as <{_ADDRESS_FORM}>."),
    (
        re.compile(r"421 4\.7\.0 (\w+) sent too many times"),
        r"421 4.7.0 Too many \1 commands on one connection; closing it.",
    ),
)


def smtp_protocol_reply(line: str) -> str:
    """aiosmtpd's own wording of a reply, reworded with an enhanced code; others unchanged."""
    stock = _SMTP_STOCK.get(line)
    if stock is not None:
        return stock
    if line[:1] in "245" and line[3:4] == " ":
        for pattern, replacement in _SMTP_STOCK_PATTERNS:
            if pattern.fullmatch(line):
                return pattern.sub(replacement, line)
    return line


__all__ += [
    "SMTP_AUTH_FAILED",
    "SMTP_AUTH_OK",
    "SMTP_AUTH_TOO_LONG",
    "SMTP_BAD_PLAIN",
    "SMTP_BUSY",
    "SMTP_INTERNAL_ERROR",
    "SMTP_RECIPIENT_OK",
    "SMTP_SENDER_OK",
    "SMTP_TLS_ACTIVE",
    "smtp_idle_timeout",
    "smtp_protocol_reply",
    "smtp_queued",
    "smtp_reply",
    "smtp_too_many_recipients",
]
