"""Gateway login accounts: which local user a mail client may log in as, and with what password.

The password only guards the loopback IMAP/SMTP gateway, but people reuse passwords, so it is
stored as a salted scrypt hash (stdlib ``hashlib.scrypt``) with its cost parameters, which
lets the cost be raised later: a stronger hash is written the next time the password is set.

Checking a password takes the same time whether or not the user exists (an unknown user is
checked against a dummy hash) and compares in constant time.  Hashing is CPU-bound for tens of
milliseconds, so :meth:`AccountStore.credential` (a quick read) and :func:`check_password`
(the slow part, safe to run in a worker thread) are separate; :meth:`AccountStore.verify` does
both for callers that do not care.  Passwords never appear in logs, errors or reprs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import dataclass, field

from onionpost.base.clock import Clock, SystemClock
from onionpost.core.errors import PasswordRejected, UnknownLocalUser
from onionpost.store.db import Database

__all__ = ["DEFAULT_COST", "AccountStore", "Credential", "ScryptCost", "check_password"]

_SALT_BYTES = 16
_DIGEST_BYTES = 32
_MAX_MEMORY = 1 << 30  # refuse stored parameters that would need more than 1 GiB


@dataclass(frozen=True)
class ScryptCost:
    n: int
    r: int
    p: int

    @property
    def memory(self) -> int:
        return 128 * self.r * self.n * self.p


#: ~50 ms and 16 MiB per check on a laptop core: the scrypt paper's interactive-login cost.
DEFAULT_COST = ScryptCost(n=1 << 14, r=8, p=1)


@dataclass(frozen=True)
class Credential:
    """What is stored for one account; ``salt`` and ``digest`` are kept out of the repr."""

    user: str
    address: str
    cost: ScryptCost
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)


def _prepare(password: str) -> bytes:
    """NFKC, so that the same password typed on two keyboards gives the same bytes."""
    return unicodedata.normalize("NFKC", password).encode("utf-8", "surrogatepass")


def _scrypt(password: str, salt: bytes, cost: ScryptCost) -> bytes:
    if cost.memory > _MAX_MEMORY:
        return b"\0" * _DIGEST_BYTES  # a tampered row: never matches
    return hashlib.scrypt(
        _prepare(password),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=cost.memory + (1 << 20),
        dklen=_DIGEST_BYTES,
    )


_SELECT = "SELECT user, address, scrypt_n, scrypt_r, scrypt_p, salt, digest FROM gateway_accounts"
_BY_USER = _SELECT + " WHERE user = ?"
_BY_ADDRESS = _SELECT + " WHERE address = ?"
_DUMMY = Credential("", "", DEFAULT_COST, b"\0" * _SALT_BYTES, b"\xff" * _DIGEST_BYTES)


def check_password(credential: Credential | None, password: str) -> bool:
    """Whether ``password`` matches; costs the same for an unknown user (``None``)."""
    target = credential or _DUMMY
    digest = _scrypt(password, target.salt, target.cost)
    matches = hmac.compare_digest(digest, target.digest)
    return matches and credential is not None


class AccountStore:
    """The ``gateway_accounts`` table of ``device.db``."""

    def __init__(
        self, db: Database, *, cost: ScryptCost = DEFAULT_COST, clock: Clock | None = None
    ) -> None:
        self._db = db
        self._cost = cost
        self._clock = clock or SystemClock()

    def add(self, user: str, address: str, password: str) -> None:
        """Create the account, or reset its address and password if it exists."""
        salt, digest = self._hash(password)
        now = self._clock.now()
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO gateway_accounts (user, address, scrypt_n, scrypt_r, scrypt_p, "
                "salt, digest, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET address = excluded.address, "
                "scrypt_n = excluded.scrypt_n, scrypt_r = excluded.scrypt_r, "
                "scrypt_p = excluded.scrypt_p, salt = excluded.salt, digest = excluded.digest, "
                "updated_at = excluded.updated_at",
                (user, address, self._cost.n, self._cost.r, self._cost.p, salt, digest, now, now),
            )

    def set_password(self, user: str, password: str) -> None:
        salt, digest = self._hash(password)
        with self._db.transaction() as conn:
            changed = conn.execute(
                "UPDATE gateway_accounts SET scrypt_n = ?, scrypt_r = ?, scrypt_p = ?, salt = ?, "
                "digest = ?, updated_at = ? WHERE user = ?",
                (self._cost.n, self._cost.r, self._cost.p, salt, digest, self._clock.now(), user),
            ).rowcount
        if not changed:
            raise UnknownLocalUser(f"There is no gateway account for {user!r}.")

    def remove(self, user: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM gateway_accounts WHERE user = ?", (user,))

    def users(self) -> list[str]:
        return [r[0] for r in self._db.all("SELECT user FROM gateway_accounts ORDER BY user")]

    def address(self, user: str) -> str:
        value = self._db.scalar("SELECT address FROM gateway_accounts WHERE user = ?", (user,))
        if value is None:
            raise UnknownLocalUser(f"There is no gateway account for {user!r}.")
        return str(value)

    def credential(self, login: str) -> Credential | None:
        """The stored credential for a login name: the local part or the whole address."""
        row = self._db.one(_BY_ADDRESS if "@" in login else _BY_USER, (login,))
        if row is None:
            return None
        cost = ScryptCost(row["scrypt_n"], row["scrypt_r"], row["scrypt_p"])
        return Credential(row["user"], row["address"], cost, row["salt"], row["digest"])

    def verify(self, user: str, password: str) -> bool:
        """Check a login in constant time (also when the user does not exist)."""
        return check_password(self.credential(user), password)

    def _hash(self, password: str) -> tuple[bytes, bytes]:
        if not password:
            raise PasswordRejected()
        salt = secrets.token_bytes(_SALT_BYTES)
        return salt, _scrypt(password, salt, self._cost)
