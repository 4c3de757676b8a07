"""Gateway accounts: scrypt hashes with stored parameters, constant-time checks, no leaks."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import pytest

from onionpost.base.clock import FakeClock
from onionpost.core.errors import PasswordRejected, UnknownLocalUser
from onionpost.store.accounts import (
    DEFAULT_COST,
    AccountStore,
    ScryptCost,
    check_password,
)
from onionpost.store.db import Database

ADDRESS = "alice@" + "a" * 56 + ".onion"
CHEAP = ScryptCost(n=1 << 10, r=8, p=1)


@pytest.fixture
def db() -> Iterator[Database]:
    database = Database(":memory:", ["accounts"])
    yield database
    database.close()


@pytest.fixture
def accounts(db: Database) -> AccountStore:
    store = AccountStore(db)
    store.add("alice", ADDRESS, "correct horse")
    return store


def test_right_and_wrong_passwords(accounts: AccountStore) -> None:
    assert accounts.verify("alice", "correct horse")
    assert not accounts.verify("alice", "correct horsE")
    assert not accounts.verify("alice", "")
    assert not accounts.verify("mallory", "correct horse")


def test_login_with_the_whole_address_or_any_case(accounts: AccountStore) -> None:
    assert accounts.verify(ADDRESS, "correct horse")
    assert accounts.verify("ALICE", "correct horse")
    assert not accounts.verify("bob@" + "a" * 56 + ".onion", "correct horse")


def test_unicode_passwords_are_normalised(accounts: AccountStore) -> None:
    accounts.set_password("alice", "caf\u00e9")  # precomposed
    assert accounts.verify("alice", "cafe\u0301")  # e + combining accent


def test_hash_is_salted_and_stores_its_cost(accounts: AccountStore, db: Database) -> None:
    accounts.add("bob", "bob@" + "b" * 56 + ".onion", "correct horse")
    rows = db.all("SELECT user, scrypt_n, scrypt_r, scrypt_p, salt, digest FROM gateway_accounts")
    assert {r["user"] for r in rows} == {"alice", "bob"}
    assert rows[0]["salt"] != rows[1]["salt"]
    assert rows[0]["digest"] != rows[1]["digest"]
    assert all((r[1], r[2], r[3]) == (DEFAULT_COST.n, DEFAULT_COST.r, DEFAULT_COST.p) for r in rows)
    for row in rows:
        assert b"correct horse" not in row["digest"]


def test_a_raised_cost_applies_at_the_next_password_change(db: Database) -> None:
    old = AccountStore(db, cost=CHEAP)
    old.add("alice", ADDRESS, "pw one")
    stronger = AccountStore(db)
    assert stronger.verify("alice", "pw one")  # old hashes keep working
    stronger.set_password("alice", "pw two")
    credential = stronger.credential("alice")
    assert credential is not None
    assert credential.cost == DEFAULT_COST


def test_set_password_for_unknown_user_and_empty_password(accounts: AccountStore) -> None:
    with pytest.raises(UnknownLocalUser):
        accounts.set_password("nobody", "x")
    with pytest.raises(PasswordRejected):
        accounts.set_password("alice", "")
    assert accounts.users() == ["alice"]
    assert accounts.address("alice") == ADDRESS
    accounts.remove("alice")
    assert accounts.users() == []
    with pytest.raises(UnknownLocalUser):
        accounts.address("alice")


def test_tampered_cost_is_refused_without_exhausting_memory(
    accounts: AccountStore, db: Database
) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE gateway_accounts SET scrypt_n = ? WHERE user = 'alice'", (1 << 30,))
    assert not accounts.verify("alice", "correct horse")


def test_secrets_stay_out_of_reprs_and_logs(
    accounts: AccountStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    accounts.set_password("alice", "hunter2-secret")
    accounts.verify("alice", "wrong-secret")
    credential = accounts.credential("alice")
    assert "digest" not in repr(credential)
    assert "salt" not in repr(credential)
    assert "secret" not in caplog.text


def test_unknown_users_cost_as_much_as_known_ones(
    accounts: AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dummy hash makes "no such user" take as long as "wrong password": the same scrypt
    work (one hash at the same cost), which is what the time of a check is made of."""
    real_scrypt = hashlib.scrypt
    calls: list[tuple[int, int, int, int, int]] = []

    def scrypt(password: bytes, *, salt: bytes, n: int, r: int, p: int, maxmem: int, dklen: int):
        calls.append((len(salt), n, r, p, dklen))
        return real_scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)

    monkeypatch.setattr(hashlib, "scrypt", scrypt)
    assert not accounts.verify("alice", "wrong")
    known = calls.copy()
    calls.clear()
    assert not accounts.verify("nobody", "wrong")
    assert len(known) == 1
    assert calls == known
    assert known[0][1:4] == (DEFAULT_COST.n, DEFAULT_COST.r, DEFAULT_COST.p)


def test_check_password_is_usable_on_its_own(accounts: AccountStore) -> None:
    credential = accounts.credential("alice")
    assert check_password(credential, "correct horse")
    assert not check_password(None, "correct horse")


def test_times_come_from_the_clock(db: Database) -> None:
    clock = FakeClock(1_700_000_000)
    store = AccountStore(db, cost=CHEAP, clock=clock)
    store.add("bob", ADDRESS, "first password")
    clock.advance(3600)
    store.set_password("bob", "second password")
    row = db.one("SELECT created_at, updated_at FROM gateway_accounts WHERE user = 'bob'")
    assert row is not None
    assert (row["created_at"], row["updated_at"]) == (1_700_000_000, 1_700_003_600)
