"""An authenticated IMAP session: pymap's logic with batch SQL where it would loop."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pymap.backend.session import BaseSession
from pymap.config import IMAPConfig
from pymap.exceptions import MailboxNotFound, MailboxReadOnly
from pymap.flags import FlagOp as PymapFlagOp
from pymap.parsing.response.code import CopyUid
from pymap.parsing.specials import SequenceSet
from pymap.parsing.specials.flag import Flag
from pymap.selected import SelectedMailbox

from gateway.imap.folders import FLAG_OPS, MailboxData, MailboxSet
from gateway.imap.messages import Message
from onionpost.store.mailbox import FlagOp


class Session(BaseSession[Message]):
    """pymap's session logic, with batch SQL where it would otherwise loop per message."""

    def __init__(self, owner: str, config: IMAPConfig, mailbox_set: MailboxSet) -> None:
        super().__init__(owner)
        self._config = config
        self._mailbox_set = mailbox_set

    @property
    def config(self) -> IMAPConfig:
        return self._config

    @property
    def mailbox_set(self) -> MailboxSet:
        return self._mailbox_set

    async def list_mailboxes(
        self,
        ref_name: str,
        filter_: str,
        subscribed: bool = False,
        selected: SelectedMailbox | None = None,
    ) -> tuple[Iterable[tuple[str, str | None, Sequence[bytes]]], SelectedMailbox | None]:
        entries, updates = await super().list_mailboxes(ref_name, filter_, subscribed, selected)
        special = self._mailbox_set.special_uses()
        listed = [
            (name, sep, [*attrs, special[name]] if name in special else attrs)
            for name, sep, attrs in entries
        ]
        return listed, updates

    async def _get_selected(self, selected: SelectedMailbox) -> MailboxData:
        # By id, not by name: a session keeps its folder when another session renames it.
        mbx = self._mailbox_set.by_object_id(selected.mailbox_id)
        if mbx is None:
            raise MailboxNotFound(str(selected.lookup))
        return mbx

    async def fetch_messages(
        self, selected: SelectedMailbox, sequence_set: SequenceSet, set_seen: bool
    ) -> tuple[Iterable[tuple[int, Message]], SelectedMailbox]:
        mbx = await self._get_selected(selected)
        wanted = selected.messages.get_all(sequence_set)
        uids = [cached.uid for _, cached in wanted]
        if set_seen:
            mbx.store.set_flags(mbx.folder_id, uids, ["\\Seen"], FlagOp.ADD)
        found = mbx.lookup(uids)
        ret = [(seq, found.get(cached.uid) or Message.gone(cached)) for seq, cached in wanted]
        return ret, await mbx.update_selected(selected)

    async def update_flags(
        self,
        selected: SelectedMailbox,
        sequence_set: SequenceSet,
        flag_set: frozenset[Flag],
        mode: PymapFlagOp = PymapFlagOp.REPLACE,
    ) -> tuple[Iterable[tuple[int, Message]], SelectedMailbox]:
        if selected.readonly:
            raise MailboxReadOnly()
        mbx = await self._get_selected(selected)
        permanent = selected.permanent_flags & flag_set
        wanted = selected.messages.get_all(sequence_set)
        uids = [cached.uid for _, cached in wanted]
        names = [str(f) for f in permanent]
        stored = mbx.store.set_flags(mbx.folder_id, uids, names, FLAG_OPS[mode])
        updated = {m.uid: Message.of(m, mbx.store) for m in stored}
        messages: list[tuple[int, Message]] = []
        for seq, cached in wanted:
            msg = updated.get(cached.uid) or Message.gone(cached)
            if not msg.expunged:
                selected.session_flags.update(cached.uid, flag_set, mode)
            messages.append((seq, msg))
        return messages, await mbx.update_selected(selected)

    async def copy_messages(
        self, selected: SelectedMailbox, sequence_set: SequenceSet, mailbox: str
    ) -> tuple[CopyUid | None, SelectedMailbox]:
        return await self._transfer(selected, sequence_set, mailbox, move=False)

    async def move_messages(
        self, selected: SelectedMailbox, sequence_set: SequenceSet, mailbox: str
    ) -> tuple[CopyUid | None, SelectedMailbox]:
        return await self._transfer(selected, sequence_set, mailbox, move=True)

    async def _transfer(
        self, selected: SelectedMailbox, sequence_set: SequenceSet, mailbox: str, *, move: bool
    ) -> tuple[CopyUid | None, SelectedMailbox]:
        mbx = await self._get_selected(selected)
        dest = await self._get_mailbox(mailbox, try_create=True)
        assert isinstance(dest, MailboxData)
        dest_selected = self._pick_selected(selected, dest)
        uids = [uid for _, uid in selected.messages.get_uids(sequence_set)]
        transfer = mbx.store.move if move else mbx.store.copy
        pairs = transfer(mbx.folder_id, uids, dest.folder_id, recent=not dest_selected)
        if dest_selected:
            for _, new_uid in pairs:
                dest_selected.session_flags.add_recent(new_uid)
        copy_uid = CopyUid(dest.uid_validity, pairs) if pairs else None
        return copy_uid, await mbx.update_selected(selected)
