"""The gateway's IMAP server: pymap's protocol engine over onionpost's SQLite mailbox.

pymap (pinned in pyproject.toml) parses IMAP and builds FETCH, SEARCH, IDLE, UIDPLUS and
MOVE responses; this package is its backend (folders and messages from
:class:`~onionpost.store.mailbox.MailboxStore`, logins from
:class:`~onionpost.store.accounts.AccountStore`) and the only place that imports it.  Where
pymap falls short for us it is subclassed, never edited:

* **No message can end a session.**  pymap builds ENVELOPE and BODYSTRUCTURE with the
  standard ``email`` parsers and crashes the connection when one raises: a ``Sender:`` with
  two addresses, an unparseable ``Date:``, MIME nested deep enough to exhaust the stack.  Mail
  is normalised when filed, and :mod:`gateway.imap.messages` also guards every field it renders, so
  a message filed before normalisation existed is still served (degraded, never fatal).
  Any other failure of a command becomes a ``NO`` (see :mod:`gateway.replies`), not a
  disconnect.
* **Headers without bodies.**  Clients sync headers of every message; pymap would load a
  whole 50 MiB message to answer ``RFC822.SIZE`` and ``BODY.PEEK[HEADER.FIELDS ...]``.
  :mod:`gateway.imap.messages` reads the header block and the stored size instead, and the body
  only when a body part is asked for.
* **IDLE within a second.**  Every commit in the store pulses a per-user event
  (:class:`gateway.imap.hub.Hub`), so an idling client hears of new mail at once; a slow
  poll remains for writers in other processes.
* **SPECIAL-USE and keywords.**  LIST carries ``\\Sent``, ``\\Drafts``... (RFC 6154),
  PERMANENTFLAGS has ``\\*`` so clients may set keywords, and FLAGS lists the keywords in use
  but never ``\\*`` (which is not a flag).
* **Privacy.**  The greeting does not name the host, and pymap's debug log of protocol lines
  (passwords and decrypted mail) is filtered out.
* **Loopback only.**  pymap allows plaintext LOGIN from loopback; with ``require_tls`` it must
  first STARTTLS like everyone else.

Modules: ``server`` (listening, dispatch, error replies), ``login``, ``session``,
``folders``, ``messages``, ``hub`` (IDLE wake-ups).
"""

from gateway.imap.server import ImapServer, start_imap

__all__ = ["ImapServer", "start_imap"]
