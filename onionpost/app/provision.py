"""Creating a data directory: the node's inbox keys, a first user, and that user's device.

``onionpost init`` calls :func:`initialize`.  It refuses to touch a directory that already
holds keys (a second run must never replace an identity), writes every key file 0600 inside
0700 directories, and leaves the inbox ready to serve the user's key bundle the moment the
node starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onionpost.base.config import CONFIG_FILE, Config
from onionpost.core.account import Account, create_identity
from onionpost.core.address import Address
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.keys import ServerSecrets
from onionpost.core.crypto.primitives import RandomSource, system_random
from onionpost.core.errors import AlreadyInitialized, UsageError
from onionpost.core.wire import KeyUpdate
from onionpost.device.keylife import prekey_lifetime
from onionpost.inbox.postoffice import Inbox
from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.inbox import InboxStore
from onionpost.store.keystore import AccountFiles, KeyStore, check_user_name, ensure_private_dir
from onionpost.store.outbox import OutboxStore

DEFAULT_CONFIG = """\
# onionpost configuration. Every setting is optional; the values shown are the defaults.
# Reference: docs/operations.md.

# role = "both"              # "inbox", "gateway" or both in one process

[tor]
# mode = "launch"            # start our own tor; "attach" uses a system tor (see torrc.example)

[gateway]
# smtp_port = 1587           # mail clients submit here (127.0.0.1 only)
# imap_port = 1143           # and read here
# lan = false                # true: also on the LAN, TLS required (onionpost lan on)

[delivery]
# lifetime_seconds = 432000  # give up (and bounce) after 5 days

[inbox]
# quota_bytes = 2147483648   # per mailbox
"""


@dataclass(frozen=True)
class Initialized:
    address: Address
    fingerprint: str
    device_name: str
    password: str | None


def is_initialized(data_dir: Path) -> bool:
    keys = KeyStore(data_dir)
    return keys.has_server() or bool(AccountFiles(keys).users())


def _refuse_existing(data_dir: Path) -> None:
    if is_initialized(data_dir):
        raise AlreadyInitialized(
            f"{data_dir} already holds an onionpost identity; refusing to overwrite its keys. "
            "Use --data-dir for another one."
        )


def write_config(data_dir: Path, role: str) -> None:
    """Write the default configuration, or set ``role`` in an existing one (a file someone
    prepared, e.g. to attach to a system tor, keeps every other line)."""
    cfg_file = data_dir / CONFIG_FILE
    line = f'role = "{role}"'
    if not cfg_file.exists():
        text = (
            DEFAULT_CONFIG
            if role == "both"
            else DEFAULT_CONFIG.replace(
                '# role = "both"              # "inbox", "gateway" or both in one process',
                line + '            # "inbox", "gateway" or "both" in one process',
            )
        )
    else:
        text = cfg_file.read_text(encoding="utf-8")
        if re.search(r"(?m)^\s*role\s*=", text):
            text = re.sub(r"(?m)^\s*role\s*=.*$", line, text, count=1)
        else:
            text = line + "\n" + text  # top-level keys must come before any [table]
    ensure_private_dir(data_dir)
    cfg_file.write_text(text, encoding="utf-8")
    cfg_file.chmod(0o600)


def initialize_inbox(config: Config, *, now: int, rng: RandomSource = system_random) -> Address:
    """An inbox-only node (``init --role inbox``): the onion and server keys, nobody's
    identity.  People get mailboxes here with ``users invite``.  Returns the inbox's onion
    (as a postmaster address, for display)."""
    _refuse_existing(config.data_dir)
    ensure_private_dir(config.data_dir)
    write_config(config.data_dir, "inbox")
    server = ServerSecrets.generate(now, rng=rng)
    KeyStore(config.data_dir).save_server(server)
    Database(config.data_dir / "inbox.db", INBOX_COMPONENTS, record_key=server.record_key()).close()
    return Address.for_key("postmaster", server.onion_pk)


def adopt_account(
    config: Config,
    account: Account,
    *,
    gateway_setup: Callable[[Config, Account], str | None] | None = None,
) -> Initialized:
    """Make this machine a device of ``account`` whose inbox is elsewhere (invite, join)."""
    files = AccountFiles(KeyStore(config.data_dir))
    files.save(account)
    if not KeyStore(config.data_dir).has_server():
        write_config(config.data_dir, "gateway")
    Database(config.data_dir / "device.db", DEVICE_COMPONENTS).close()  # created, migrated
    password = gateway_setup(config, account) if gateway_setup else None
    return Initialized(account.address, fingerprint(account.uik_pk), account.device.name, password)


def initialize(
    config: Config,
    *,
    local: str,
    device_name: str,
    now: int,
    rng: RandomSource = system_random,
    gateway_setup: Callable[[Config, Account], str | None] | None = None,
) -> Initialized:
    """Create the inbox keys, the first user and this device; ``gateway_setup`` creates
    mail-client credentials and certificates and returns the user's new password."""
    data_dir = config.data_dir
    _refuse_existing(data_dir)
    check_user_name(local)
    ensure_private_dir(data_dir)
    cfg_file = data_dir / CONFIG_FILE
    if not cfg_file.exists():
        cfg_file.write_text(DEFAULT_CONFIG, encoding="utf-8")
        cfg_file.chmod(0o600)
    server = ServerSecrets.generate(now, rng=rng)
    KeyStore(data_dir).save_server(server)
    return add_user(
        config,
        local=local,
        device_name=device_name,
        now=now,
        rng=rng,
        gateway_setup=gateway_setup,
    )


def add_user(
    config: Config,
    *,
    local: str,
    device_name: str,
    now: int,
    rng: RandomSource = system_random,
    gateway_setup: Callable[[Config, Account], str | None] | None = None,
) -> Initialized:
    """Another user on this node's inbox (a household): identity, device, mailbox, login."""
    check_user_name(local)
    if not device_name.strip() or len(device_name.encode()) > 64:
        raise UsageError("A device name must be 1 to 64 bytes long.")
    keys = KeyStore(config.data_dir)
    files = AccountFiles(keys)
    if local in files.users():
        raise UsageError(f"There is already a user '{local}' here.")
    server = keys.load_server()
    account = create_identity(
        local,
        device_name,
        onion_pk=server.onion_pk,
        sek_id=server.current().sek_id,
        sek_pk=server.current().public,
        now=now,
        prekey_lifetime=prekey_lifetime(config.keys),
        rng=rng,
    )
    inbox_db = Database(
        config.data_dir / "inbox.db", INBOX_COMPONENTS, record_key=server.record_key()
    )
    try:
        inbox = Inbox(
            store=InboxStore(inbox_db),
            outbox=OutboxStore(inbox_db),
            secrets=server,
            config=config.inbox,
            rng=rng,
        )
        if inbox.store.mailbox_by_local(local) is not None:
            raise UsageError(f"This inbox already has a mailbox named '{local}'.")
        register(inbox, account, now=now)
    finally:
        inbox_db.close()
    files.save(account)
    Database(config.data_dir / "device.db", DEVICE_COMPONENTS).close()  # created, migrated
    password = gateway_setup(config, account) if gateway_setup else None
    return Initialized(account.address, fingerprint(account.uik_pk), device_name, password)


def register(inbox: Inbox, account: Account, *, now: int) -> None:
    """Open a mailbox on ``inbox`` for a freshly created identity and publish its keys."""
    account.binding = inbox.register_mailbox(
        local=account.local, mailbox_id=account.mailbox_id, binding=account.binding, now=now
    )
    inbox.publish(
        account.mailbox_id,
        KeyUpdate(device_list=account.device_list, prekeys=[account.device.signed_prekey()]),
        now,
    )
    inbox.store.add_token(account.mailbox_id, inbox.token_hash(account.self_token), now)
