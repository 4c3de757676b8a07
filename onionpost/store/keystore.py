"""Private key files in the data directory.

Key files are written atomically (temporary file, fsync, rename, fsync of the directory), so a
crash never leaves a half-written key, and with mode 0600 inside 0700 directories.  Nothing
here logs key material.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from onionpost.base.atomicfile import write_atomic
from onionpost.core.account import Account
from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.keys import (
    DeviceList,
    DeviceSecrets,
    IdentitySecrets,
    Profile,
    ServerBinding,
    ServerSecrets,
)
from onionpost.core.errors import DataDirError, NotInitialized, OnionpostError

T = TypeVar("T")
#: Left in <data>/run by `onionpost keys rotate` before it pokes the running node, which owns
#: the key files while it runs (a second writer could lose a rotated key).
ROTATE_REQUEST = "rotate-keys"
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700, and tighten it if it already exists."""
    try:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o700)
            d.chmod(0o700)  # mkdir's mode is filtered by the umask
        mode = stat.S_IMODE(path.stat().st_mode)
        # Group search alone (0710) is kept: a root node's private Dovecot passes through
        # the data directory that way to its Maildirs (gateway/dovecot.py); nothing is listed.
        if mode & 0o067:
            path.chmod(0o700)
    except OSError as exc:
        raise DataDirError(f"Cannot create the directory {path}: {exc.strerror}.") from exc
    return path


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, durable on return."""
    ensure_private_dir(path.parent)
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise DataDirError(f"Cannot write {path}: {exc.strerror}.") from exc


def read_private(path: Path) -> bytes:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)  # repair permissions loosened by a copy or a restore
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NotInitialized(f"{path} is missing. Run `onionpost init` first.") from exc
    except OSError as exc:
        raise DataDirError(f"Cannot read {path}: {exc.strerror}.") from exc


def check_user_name(name: str) -> str:
    if not _USER_NAME.match(name):
        raise DataDirError(
            f"'{name}' cannot be a user name: use 1 to 64 lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit."
        )
    return name


class KeyStore:
    """The key files of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    # -- paths ----------------------------------------------------------------------------

    @property
    def server_file(self) -> Path:
        return self.data_dir / "inbox" / "server.key"

    def user_dir(self, local: str) -> Path:
        return self.data_dir / "users" / check_user_name(local)

    def identity_file(self, local: str) -> Path:
        return self.user_dir(local) / "identity.key"

    def device_file(self, local: str) -> Path:
        return self.user_dir(local) / "device.key"

    def device_list_file(self, local: str) -> Path:
        return self.user_dir(local) / "device-list"

    # -- queries --------------------------------------------------------------------------

    def users(self) -> list[str]:
        base = self.data_dir / "users"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "device.key").exists())

    def has_user_files(self, local: str) -> bool:
        """Whether anything of ``local`` is left in ``users/`` (also a half-removed user)."""
        return self.user_dir(local).exists()

    def remove_user(self, local: str) -> None:
        """Delete a user's key files.  The directory is first moved out of ``users/`` in one
        rename, so the running node (and ``users()``) sees the user either whole or gone,
        never a directory with some of the keys missing."""
        source = self.user_dir(local)
        trash = self.data_dir / f".removing-{local}"
        try:
            if trash.exists():
                shutil.rmtree(trash)  # left over from an interrupted removal
            if source.exists():
                source.rename(trash)
                shutil.rmtree(trash)
        except OSError as exc:
            raise DataDirError(f"Cannot delete the files of {local}: {exc.strerror}.") from exc

    def has_server(self) -> bool:
        return self.server_file.exists()

    def has_identity(self, local: str) -> bool:
        return self.identity_file(local).exists()

    # -- load and save --------------------------------------------------------------------

    def load_server(self) -> ServerSecrets:
        return _parse(ServerSecrets.parse, self.server_file)

    def save_server(self, secrets: ServerSecrets) -> None:
        write_private(self.server_file, secrets.encode())

    def load_identity(self, local: str) -> IdentitySecrets:
        return _parse(IdentitySecrets.parse, self.identity_file(local))

    def save_identity(self, secrets: IdentitySecrets) -> None:
        write_private(self.identity_file(secrets.local), secrets.encode())

    def load_device(self, local: str) -> DeviceSecrets:
        return _parse(DeviceSecrets.parse, self.device_file(local))

    def save_device(self, local: str, secrets: DeviceSecrets) -> None:
        write_private(self.device_file(local), secrets.encode())

    def load_device_list(self, local: str) -> DeviceList:
        return _parse(DeviceList.parse, self.device_list_file(local))

    def save_device_list(self, local: str, device_list: DeviceList) -> None:
        write_private(self.device_list_file(local), device_list.encode())


def _parse(parse: Callable[[bytes], T], path: Path) -> T:
    raw = read_private(path)
    try:
        return parse(raw)
    except OnionpostError as exc:
        raise DataDirError(f"{path} is damaged: {exc}") from exc


class AccountFiles:
    """An account's files in the data directory (0600, written atomically like every key)."""

    MAGIC = b"OPac"

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    PROFILE_MAGIC = b"OPmp"

    def _info_file(self, local: str) -> Path:
        return self.keys.user_dir(local) / "account"

    def _profile_file(self, local: str) -> Path:
        return self.keys.user_dir(local) / "profile"

    def exists(self, local: str) -> bool:
        return self._info_file(local).exists()

    def users(self) -> list[str]:
        return [u for u in self.keys.users() if self.exists(u)]

    def save(self, account: Account) -> None:
        info = (
            Writer()
            .raw(self.MAGIC)
            .var8(account.local.encode("ascii"))
            .fixed(account.onion_pk, 32)
            .fixed(account.mailbox_id, 16)
            .fixed(account.self_token, 32)
            .var16(account.binding.encode())
            .getvalue()
        )
        if account.identity is not None:
            self.keys.save_identity(account.identity)
        self.keys.save_device(account.local, account.device)
        self.keys.save_device_list(account.local, account.device_list)
        self.save_profile(account)
        write_private(self._info_file(account.local), info)

    def save_profile(self, account: Account) -> None:
        """Write the account's profile and card (nothing when it has none).  A newer profile
        already on disk is kept: ``onionpost profile set`` may have written it while the node
        ran, and the node's next save of its keys must not put the older one back before it
        has adopted the new one (see ``Device.adopt_profile``)."""
        if account.profile is None or account.profile_card is None:
            return
        with contextlib.suppress(OnionpostError):
            on_disk, _ = self.load_profile(account.local)
            if on_disk is not None and on_disk.issued_at > account.profile.issued_at:
                return
        profile = (
            Writer()
            .raw(self.PROFILE_MAGIC)
            .var32(account.profile.encode())
            .var32(account.profile_card.encode())
            .getvalue()
        )
        write_private(self._profile_file(account.local), profile)

    def load(self, local: str) -> Account:
        path = self._info_file(local)
        raw = read_private(path)
        try:
            r = Reader(raw, "account file")
            r.magic(self.MAGIC)
            stored_local = r.var8("user name", 64).decode("ascii", "replace")
            onion_pk = r.fixed(32, "inbox key")
            mailbox_id = r.fixed(16, "mailbox id")
            self_token = r.fixed(32, "own token")
            binding = ServerBinding.parse(r.var16("server binding"))
            r.end()
        except OnionpostError as exc:
            raise DataDirError(f"{path} is damaged: {exc}") from exc
        if stored_local != local:
            raise DataDirError(f"{path} belongs to '{stored_local}', not '{local}'.")
        identity = self.keys.load_identity(local) if self.keys.has_identity(local) else None
        profile, card = self.load_profile(local)
        return Account(
            local,
            onion_pk,
            mailbox_id,
            self_token,
            binding,
            self.keys.load_device_list(local),
            self.keys.load_device(local),
            identity,
            profile,
            card,
        )

    def load_profile(self, local: str) -> tuple[Profile | None, Profile | None]:
        """The profile this device published for ``local`` and its card (none yet: both
        None)."""
        path = self._profile_file(local)
        if not path.exists():
            return None, None
        raw = read_private(path)
        try:
            r = Reader(raw, "profile file")
            r.magic(self.PROFILE_MAGIC)
            profile = Profile.parse(r.var32("profile", 128 * 1024))
            card = Profile.parse(r.var32("profile card", 1024))
            r.end()
        except OnionpostError as exc:
            raise DataDirError(f"{path} is damaged: {exc}") from exc
        return profile, card
