"""SQLite storage: the only package that touches sqlite3.

Two database files per data directory, each a set of independently versioned components
(see ``db.py``): ``inbox.db`` for the inbox role, ``device.db`` for the gateway role.
"""

INBOX_COMPONENTS = ("inbox", "outbox", "enrolment")
DEVICE_COMPONENTS = ("mailbox", "accounts", "contacts", "submissions")
