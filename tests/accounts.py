"""Mail-client accounts for the gateway tests, in memory.

Logins are checked with scrypt; the tests use a cheap cost so that they stay fast, and an
in-memory database so that nothing outlives the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from onionpost.store.accounts import AccountStore, ScryptCost
from onionpost.store.db import Database

CHEAP = ScryptCost(n=1 << 10, r=8, p=1)


@contextmanager
def account_store(*accounts: tuple[str, str, str]) -> Iterator[AccountStore]:
    """A store holding each ``(user, address, password)``, closed afterwards."""
    db = Database(":memory:", ["accounts"])
    try:
        store = AccountStore(db, cost=CHEAP)
        for user, address, password in accounts:
            store.add(user, address, password)
        yield store
    finally:
        db.close()
