"""Whether sealed mail fits its mailbox: the quota decided in one place.

An inbox stores sealed mail for its mailboxes' devices until they fetch it, and each mailbox
may hold only so much.  Three places need the answer and ask here:

- :meth:`onionpost.inbox.postoffice.Inbox.accept` takes the mailbox's limit from :func:`limit` (its
  own quota, or the inbox's default) — and so does :mod:`onionpost.inbox.enrolment` when an invite
  hands a quota on;
- :meth:`onionpost.store.inbox.InboxStore.accept_sealed` asks :func:`refusal` twice: before
  its transaction (a refusal there first prunes expired mail, so only live mail can fill a
  mailbox) and inside it, against the usage it just read, raising the refusal it gets;
- :func:`onionpost.core.wire.refusal` asks :func:`is_full` whether an error means a full mailbox
  (answered with :data:`FULL_STATUS`, 507), including the wrapped form a delivery carries
  across to the sending inbox (``TemporaryDeliveryError`` whose reason is
  ``QuotaExceeded``).

A full mailbox is temporary (4.2.2): the sender's outbox retries until the owner's devices
fetch (and so free) their mail, or the message's lifetime ends.

A nearly full *disk* is the machine's limit, not a mailbox's: :func:`short_of_disk` decides
it for new mail from mail clients (:class:`onionpost.device.submission.Submissions`) and from
other inboxes (:meth:`onionpost.inbox.postoffice.Inbox.accept`), which refuse it with
``DiskFull`` (4.3.1, temporary) while less than ``Config.min_free_mib`` would stay free.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from onionpost.core.errors import OnionpostError, QuotaExceeded

#: The HTTP status a full mailbox is answered with (RFC 4918 "Insufficient Storage").
FULL_STATUS = 507

_MIB = 1 << 20


def limit(mailbox_quota: int | None, default: int) -> int:
    """A mailbox's limit in bytes: its own quota, or the inbox's default when it has none
    (``None``, or 0 as older rows may hold)."""
    return mailbox_quota or default


def refusal(*, used: int, size: int, quota: int) -> QuotaExceeded | None:
    """None if ``size`` more bytes fit beside ``used`` within ``quota``; otherwise the error
    that refuses them (the caller raises it, or prunes first and asks again)."""
    if used + size <= quota:
        return None
    return QuotaExceeded(
        f"The recipient's mailbox is full ({used // _MIB} MiB of "
        f"{quota // _MIB} MiB used); delivery will be retried."
    )


def short_of_disk(*, free: int, incoming: int, reserve: int) -> bool:
    """Whether storing ``incoming`` more bytes would leave less than ``reserve`` free (0: no
    reserve, never short).  A refusal here is cheap and clean; a disk that fills up in the
    middle of a commit is neither."""
    return reserve > 0 and free - incoming < reserve


def is_full(exc: OnionpostError) -> bool:
    """Whether ``exc`` refuses mail because a mailbox is full, directly or as the reason a
    delivery error carries (:meth:`~onionpost.core.errors.DeliveryError.from_error`)."""
    return isinstance(exc, QuotaExceeded) or getattr(exc, "reason", "") == QuotaExceeded.__name__
