"""Delivery status notifications (RFC 3464), so mail clients show delays and bounces natively.

A notice is a ``multipart/report; report-type=delivery-status`` message with three parts: a
sentence for people, the machine-readable ``message/delivery-status`` (one block per
recipient with Action, Status and the recipient inbox's own words), and the original
message's headers (``text/rfc822-headers``), exactly what Postfix sends.  Pure: times are
passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal

Action = Literal["failed", "delayed"]
MAX_HEADERS = 64 * 1024


@dataclass(frozen=True)
class RecipientStatus:
    address: str
    action: Action
    status: str  # RFC 3463 enhanced code, e.g. "5.1.1"
    diagnostic: str
    last_attempt: int | None = None
    retry_until: int | None = None


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def build(
    *,
    user_address: str,
    reporting_onion: str,
    original_headers: bytes,
    arrival: int,
    now: int,
    recipients: Sequence[RecipientStatus],
) -> bytes:
    """A complete RFC 5322 message containing the notification."""
    failed = [r for r in recipients if r.action == "failed"]
    subject = (
        "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    )
    seed = hashlib.blake2b(
        b"|".join(
            [
                original_headers[:4096],
                str(now).encode(),
                *(f"{r.address}:{r.action}:{r.status}".encode() for r in recipients),
            ]
        ),
        digest_size=12,
    ).hexdigest()
    boundary = f"onionpost-report-{seed}"
    human = _human_text(recipients, failed=bool(failed))
    status_blocks = [
        f"Reporting-MTA: dns; {reporting_onion}\r\nArrival-Date: {formatdate(arrival)}\r\n"
    ]
    for r in recipients:
        block = (
            f"Final-Recipient: rfc822; {r.address}\r\n"
            f"Action: {r.action}\r\n"
            f"Status: {r.status}\r\n"
            f"Diagnostic-Code: X-Onionpost; {_clean(r.diagnostic)[:900]}\r\n"
        )
        if r.last_attempt:
            block += f"Last-Attempt-Date: {formatdate(r.last_attempt)}\r\n"
        if r.retry_until and r.action == "delayed":
            block += f"Will-Retry-Until: {formatdate(r.retry_until)}\r\n"
        status_blocks.append(block)
    headers = original_headers[:MAX_HEADERS].rstrip(b"\r\n").replace(b"\r\n", b"\n")
    headers = headers.replace(b"\n", b"\r\n")
    head = (
        f"From: Mail Delivery System <postmaster@{reporting_onion}>\r\n"
        f"To: {user_address}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(now)}\r\n"
        f"Message-ID: <dsn.{seed}@{reporting_onion}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated delivery status notification.\r\n"
    )
    parts = [
        "Content-Type: text/plain; charset=utf-8\r\nContent-Description: Notification\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + human,
        "Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n"
        + "\r\n".join(status_blocks),
    ]
    out = head.encode()
    for part in parts:
        out += f"\r\n--{boundary}\r\n".encode() + part.encode("utf-8")
    out += (
        f"\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n"
        "Content-Description: Undelivered Message Headers\r\n\r\n"
    ).encode()
    out += headers + f"\r\n\r\n--{boundary}--\r\n".encode()
    return out


def _human_text(recipients: Sequence[RecipientStatus], *, failed: bool) -> str:
    if failed:
        lines = [
            "onionpost could not deliver your message to the following recipient(s). "
            "It will not try again.",
            "",
        ]
    else:
        lines = [
            "onionpost has not yet been able to deliver your message to the following "
            "recipient(s). It keeps trying; you do not need to send it again.",
            "",
        ]
    for r in recipients:
        lines.append(f"  {r.address}")
        lines.append(f"    {_clean(r.diagnostic)} ({r.status})")
        if r.action == "delayed" and r.retry_until:
            lines.append(f"    Still trying until {formatdate(r.retry_until)}.")
        lines.append("")
    lines.append("The headers of your message are attached.")
    return "\r\n".join(lines) + "\r\n"


def device_change_notice(
    *,
    user_address: str,
    onion_domain: str,
    added: Sequence[tuple[str, str, int]],
    revoked: Sequence[tuple[str, int]],
    version: int,
    now: int,
) -> bytes:
    """The mail a person's devices file when their device list changed: a device added
    without them knowing is then visible everywhere.  ``added`` holds (name, id, when),
    ``revoked`` (id, when); ids in hex."""
    lines = []
    for name, device_id, when in added:
        lines.append(
            f"  added:   {_clean(name)} ({device_id[:12]}), {formatdate(when, usegmt=True)}"
        )
    for device_id, when in revoked:
        lines.append(f"  revoked: {device_id[:12]}, {formatdate(when, usegmt=True)}")
    what = "added" if added and not revoked else "revoked" if revoked and not added else "changed"
    text = (
        f"Your list of devices changed (version {version}):\r\n\r\n"
        + "\r\n".join(lines)
        + "\r\n\r\nEvery device in the list can read mail sent to you from now on. If you did "
        "not do this, revoke the device at once from one of your devices that holds your "
        "identity key (onionpost devices revoke ID) and see `onionpost devices`.\r\n"
    )
    return (
        f"From: onionpost <postmaster@{onion_domain}>\r\n"
        f"To: {user_address}\r\n"
        f"Subject: A device was {what} on your account\r\n"
        f"Date: {formatdate(now, usegmt=True)}\r\n"
        f"Message-ID: <devices.{version}.{now}@{onion_domain}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "X-Onionpost-Notice: devices-changed\r\n"
        "\r\n" + text
    ).encode("utf-8")
