"""Folders as pymap sees them: each a thin view of one row of the mailbox store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Iterable, Sequence
from datetime import UTC, datetime

from pymap.backend.mailbox import MailboxDataInterface, MailboxSetInterface
from pymap.concurrent import Event
from pymap.exceptions import MailboxNotFound
from pymap.flags import FlagOp as PymapFlagOp
from pymap.interfaces.message import CachedMessage
from pymap.listtree import ListTree
from pymap.mailbox import MailboxSnapshot
from pymap.parsing.message import AppendMessage
from pymap.parsing.specials import ObjectId, SequenceSet
from pymap.parsing.specials.flag import Flag, Recent, Wildcard, get_system_flags
from pymap.selected import SelectedMailbox, SelectedSet

from gateway.imap.hub import Hub
from gateway.imap.messages import Message, flag
from onionpost.errors import FolderError, FolderExists, FolderNotFound
from onionpost.store.mailbox import FlagOp, Folder, FolderStatus, MailboxStore

#: IDLE re-checks the database this often even without a notification, for writers in
#: other processes (the CLI, a second node on the same data directory).
POLL_SECONDS = 5.0
#: ``\\*``: clients may create keywords ($Forwarded, $Junk, $label1...) on any message.
PERMANENT = frozenset(get_system_flags() - {Recent}) | {Wildcard}
FLAG_OPS = {
    PymapFlagOp.ADD: FlagOp.ADD,
    PymapFlagOp.DELETE: FlagOp.REMOVE,
    PymapFlagOp.REPLACE: FlagOp.REPLACE,
}


class MailboxSet(MailboxSetInterface["MailboxData"]):
    """A user's folders; names are validated and kept by the store."""

    def __init__(self, user: str, store: MailboxStore, hub: Hub) -> None:
        self._user = user
        self._store = store
        self._hub = hub

    @property
    def delimiter(self) -> str:
        return "/"

    def special_uses(self) -> dict[str, bytes]:
        """Folder name -> LIST attribute (``Sent``; pymap adds the backslash)."""
        return {
            f.name: f.special_use[1:].encode("ascii")
            for f in self._store.folders(self._user)
            if f.special_use
        }

    def by_object_id(self, object_id: ObjectId) -> MailboxData | None:
        try:
            folder_id = int(object_id.value[1:])
        except ValueError:
            return None
        folder = self._store.folder_by_id(folder_id)
        if folder is None or folder.user != self._user:
            return None
        return MailboxData(self._store, self._hub, folder)

    async def set_subscribed(self, name: str, subscribed: bool) -> None:
        # RFC 3501 lets clients subscribe to names that do not exist; those are ignored.
        with contextlib.suppress(FolderError):
            self._store.set_subscribed(self._user, name, subscribed)

    async def list_subscribed(self) -> ListTree:
        names = [f.name for f in self._store.folders(self._user) if f.subscribed]
        return ListTree(self.delimiter).update("INBOX", *names)

    async def list_mailboxes(self) -> ListTree:
        names = [f.name for f in self._store.folders(self._user)]
        return ListTree(self.delimiter).update("INBOX", *names)

    async def get_mailbox(self, name: str) -> MailboxData:
        try:
            folder = self._store.folder(self._user, name)
        except FolderError as exc:
            raise KeyError(name) from exc
        return MailboxData(self._store, self._hub, folder)

    async def add_mailbox(self, name: str) -> ObjectId:
        try:
            folder = self._store.create_folder(self._user, name)
        except FolderExists as exc:
            raise ValueError(name) from exc
        return folder_object_id(folder.id)

    async def delete_mailbox(self, name: str) -> None:
        try:
            self._store.delete_folder(self._user, name)
        except FolderNotFound as exc:
            raise KeyError(name) from exc

    async def rename_mailbox(self, before: str, after: str) -> None:
        try:
            self._store.rename_folder(self._user, before, after)
        except FolderNotFound as exc:
            raise KeyError(before) from exc
        except FolderExists as exc:
            raise ValueError(after) from exc


def folder_object_id(folder_id: int) -> ObjectId:
    return ObjectId(b"F%d" % folder_id)


class _Snapshot(MailboxSnapshot):
    """FLAGS lists the keywords in use and leaves out ``\\*`` (only for PERMANENTFLAGS)."""

    def __init__(self, folder: Folder, status: FolderStatus) -> None:
        super().__init__(
            folder_object_id(folder.id),
            False,
            status.uidvalidity,
            PERMANENT,
            frozenset({Recent}),
            status.exists,
            status.recent,
            status.unseen,
            status.first_unseen,
            status.uidnext,
        )
        self._keywords = frozenset(flag(k) for k in status.keywords)

    @property
    def flags(self) -> frozenset[Flag]:
        return (self.permanent_flags - {Wildcard}) | self.session_flags | self._keywords


class MailboxData(MailboxDataInterface["Message"]):
    """One folder, as pymap sees it; a fresh object per lookup, state lives in the store."""

    def __init__(self, store: MailboxStore, hub: Hub, folder: Folder) -> None:
        self.store = store
        self._hub = hub
        self._folder = folder
        self.folder_id = folder.id

    @property
    def mailbox_id(self) -> ObjectId:
        return folder_object_id(self.folder_id)

    @property
    def readonly(self) -> bool:
        return False

    @property
    def uid_validity(self) -> int:
        return self._folder.uidvalidity

    @property
    def permanent_flags(self) -> frozenset[Flag]:
        return PERMANENT

    @property
    def selected_set(self) -> SelectedSet:
        return self._hub.selected_set(self.folder_id)

    def lookup(self, uids: Sequence[int]) -> dict[int, Message]:
        found = self.store.messages_by_uid(self.folder_id, uids)
        return {uid: Message.of(m, self.store) for uid, m in found.items()}

    async def update_selected(
        self, selected: SelectedMailbox, *, wait_on: Event | None = None
    ) -> SelectedMailbox:
        since: int | None = selected.mod_sequence
        if wait_on is not None and since is not None and self.store.modseq(self.folder_id) == since:
            # Nothing new yet: sleep until this user's mailbox changes, the client says DONE,
            # or the poll interval passes.  No await between the check and the wait, so no
            # change can slip in unnoticed.
            either = wait_on.or_event(self._hub.event(self._folder.user))
            await either.wait(timeout=POLL_SECONDS)
        try:
            if since is None:
                modseq = self.store.modseq(self.folder_id)
                if modseq is None:
                    raise FolderNotFound()
                everything = self.store.messages(self.folder_id)
                selected.set_messages([Message.of(m, self.store) for m in everything])
                selected.mod_sequence = modseq
                return selected
            changes = self.store.changes(self.folder_id, since)
        except FolderNotFound:
            selected.set_deleted()
            return selected
        messages = [Message.of(m, self.store) for m in changes.updated]
        if changes.full:
            selected.set_messages(messages)
        else:
            selected.add_updates(messages, changes.expunged)
        selected.mod_sequence = changes.modseq
        return selected

    async def append(self, append_msg: AppendMessage, *, recent: bool = False) -> Message:
        folder = self.store.folder_by_id(self.folder_id)
        if folder is None:
            raise MailboxNotFound(self._folder.name)
        when = append_msg.when or datetime.now(UTC)
        uid = self.store.file_message(
            folder.user,
            folder.name,
            bytes(append_msg.literal),
            flags=[str(f) for f in append_msg.flag_set],
            internal_date=int(when.timestamp()),
            recent=recent,
        )
        assert uid is not None  # only filing with a seen id can return None
        return self.lookup([uid])[uid]

    async def copy(self, uid: int, destination: MailboxData, *, recent: bool = False) -> int | None:
        pairs = self.store.copy(self.folder_id, [uid], destination.folder_id, recent=recent)
        return pairs[0][1] if pairs else None

    async def move(self, uid: int, destination: MailboxData, *, recent: bool = False) -> int | None:
        pairs = self.store.move(self.folder_id, [uid], destination.folder_id, recent=recent)
        return pairs[0][1] if pairs else None

    async def get(self, uid: int, cached_msg: CachedMessage) -> Message:
        return self.lookup([uid]).get(uid) or Message.gone(cached_msg)

    async def update(
        self, uid: int, cached_msg: CachedMessage, flag_set: frozenset[Flag], mode: PymapFlagOp
    ) -> Message:
        names = [str(f) for f in flag_set]
        stored = self.store.set_flags(self.folder_id, [uid], names, FLAG_OPS[mode])
        return Message.of(stored[0], self.store) if stored else Message.gone(cached_msg)

    async def delete(self, uids: Iterable[int]) -> None:
        self.store.expunge(self.folder_id, list(uids))

    async def claim_recent(self, selected: SelectedMailbox) -> None:
        for uid in self.store.claim_recent(self.folder_id):
            selected.session_flags.add_recent(uid)

    async def cleanup(self) -> None:
        pass

    async def snapshot(self) -> MailboxSnapshot:
        return _Snapshot(self._folder, self.store.status(self.folder_id))

    async def find(
        self, seq_set: SequenceSet, selected: SelectedMailbox
    ) -> AsyncIterable[tuple[int, Message]]:
        wanted = selected.messages.get_all(seq_set)
        found = self.lookup([cached.uid for _, cached in wanted])
        for seq, cached in wanted:
            yield seq, found.get(cached.uid) or Message.gone(cached)

    async def find_deleted(self, seq_set: SequenceSet, selected: SelectedMailbox) -> Sequence[int]:
        deleted = set(self.store.deleted_uids(self.folder_id))
        return [uid for _, uid in selected.messages.get_uids(seq_set) if uid in deleted]
