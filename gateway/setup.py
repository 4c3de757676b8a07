"""The gateway's part of ``onionpost init``: the user's mail-client login and the local CA."""

from __future__ import annotations

import secrets

from gateway.tls import ensure_tls
from onionpost.base.config import Config
from onionpost.core.account import Account
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.accounts import AccountStore
from onionpost.store.db import Database

PASSWORD_WORDS = 5


def new_password() -> str:
    """A random password that is easy to type: 5 groups of 5 lower-case letters and digits."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"  # no l/1/o/0 to misread
    return "-".join(
        "".join(secrets.choice(alphabet) for _ in range(5)) for _ in range(PASSWORD_WORDS)
    )


def _dovecot_password(config: Config, user: str, password: str | None) -> None:
    """Keep the private Dovecot's passwd-file in step with the gateway login (its IMAP
    server-to-be); it stores only its own hash.  Without Dovecot installed there is nothing
    to keep in step."""
    from gateway.dovecot import Layout, PasswdFile, find_installation
    from onionpost.core.errors import MailServerNotInstalled

    passwd = PasswdFile(Layout(config.data_dir))
    if password is None:
        passwd.remove(user)
        return
    try:
        inst = find_installation()
    except MailServerNotInstalled:
        return
    passwd.set_password(inst, user, password)


def forget_login(config: Config, user: str) -> int:
    """A removed user's IMAP login and mail (their Maildir) go too; returns how many
    messages were deleted."""
    import shutil

    from gateway.dovecot import Layout

    _dovecot_password(config, user, None)
    maildir = Layout(config.data_dir).maildir(user)
    count = sum(
        1 for sub in maildir.rglob("*") if sub.parent.name in ("cur", "new") and sub.is_file()
    )
    shutil.rmtree(maildir, ignore_errors=True)
    return count


def setup_account(config: Config, account: Account) -> str:
    """Create the user's gateway login with a fresh password (returned, shown once)."""
    ensure_tls(config.data_dir / "tls")
    db = Database(config.data_dir / "device.db", DEVICE_COMPONENTS)
    try:
        password = new_password()
        store = AccountStore(db)
        if account.local in store.users():
            store.set_password(account.local, password)
        else:
            store.add(account.local, str(account.address), password)
        _dovecot_password(config, account.local, password)
        return password
    finally:
        db.close()


def set_password(config: Config, user: str, password: str | None) -> str:
    """Change a user's gateway password (a new random one when ``password`` is None)."""
    db = Database(config.data_dir / "device.db", DEVICE_COMPONENTS)
    try:
        chosen = password or new_password()
        AccountStore(db).set_password(user, chosen)
        _dovecot_password(config, user, chosen)
        return chosen
    finally:
        db.close()
