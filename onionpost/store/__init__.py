"""SQLite storage: the only package that touches sqlite3.

Two database files per data directory, each a set of independently versioned components
(see ``db.py``): ``inbox.db`` for the inbox role, ``device.db`` for the gateway role.

Components are migrated in the order listed.  The order of ``DEVICE_COMPONENTS`` matters:
contacts migration 0002 reads the users of the ``seen`` and ``accounts`` tables to give each
of them a copy of the formerly shared contacts, so those two come first.  ``filing`` is the
queue of mail on its way into Dovecot.  The mail itself is Dovecot's (``<data>/mail``); the
``mailbox`` migrations are kept for ``gateway/mailbox_upgrade.py``'s fixture and history.
"""

INBOX_COMPONENTS = ("inbox", "outbox", "enrolment")
DEVICE_COMPONENTS = ("seen", "accounts", "contacts", "submissions", "filing")
