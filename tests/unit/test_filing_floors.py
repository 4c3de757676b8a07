"""The filer's searches of a folder start at a UID floor when one is known, and still find
what they must (issue 12, cost growth: a header search of a whole 100,000-message folder
took longer than doveadm's timeout).

A floor is a UIDNEXT read *before* the row existed (for the client's own Sent copy and a
handed row after a crash).  A Sent copy is saved with its \\Seen flag, so the copy just
filed is never searched for.  With no floor known (after a restart) the whole folder is
searched, as before.
"""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

from onionpost.base.clock import FakeClock
from onionpost.device.filing import FILING_HEADER, Filer
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.filing import FILED, HANDED, FilingStore
from onionpost.testing.mailstore import MemorySink


class RecordingSink(MemorySink):
    """A MemorySink that remembers the floor of every search."""

    def __init__(self) -> None:
        super().__init__()
        self.searches: list[tuple[str, str, int]] = []  # (kind, header, from_uid)

    async def holds(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> bool:
        self.searches.append(("holds", header, from_uid))
        return await super().holds(user, folder, header, value, from_uid=from_uid)

    async def mark_seen(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> None:
        self.searches.append(("seen", header, from_uid))
        await super().mark_seen(user, folder, header, value, from_uid=from_uid)

    def save(self, folder: str, message: bytes) -> None:
        """A message the mail client saved itself (IMAP APPEND)."""
        self.boxes.setdefault(("ann", folder), []).append((message, set()))


def message(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "ann@example.onion"
    msg["To"] = "bo@example.onion"
    msg["Subject"] = f"mail {n}"
    msg["Message-ID"] = f"<mail.{n}@test>"
    msg.set_content(f"body {n}")
    return msg.as_bytes().replace(b"\n", b"\r\n")


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(1_000)
        self.db = Database(tmp_path / "device.db", DEVICE_COMPONENTS)
        self.store = FilingStore(self.db, tmp_path / "filing")
        self.sink = RecordingSink()
        self.filer = Filer(self.store, clock=self.clock, sink=self.sink)
        for n in range(50):  # an old Sent folder
            self.sink.save("Sent", message(-n - 1))

    @property
    def now(self) -> int:
        return self.clock.now()

    @now.setter
    def now(self, value: int) -> None:
        self.clock.advance(value - self.clock.now())

    def sent_copy(self, n: int, *, wait: int = 0) -> int | None:
        """What a submission queues (onionpost/device/submission.py): a Sent copy, marked seen,
        filed only if the client saved none within ``wait`` seconds."""
        with self.db.transaction():
            return self.filer.queue(
                key=f"sent {n}".encode().ljust(16, b"."),
                user="ann",
                folder="Sent",
                message=message(n),
                mark_seen=True,
                unless_message_id=f"<mail.{n}@test>" if wait else None,
                wait=wait,
                in_database=True,
            )


def copies(sink: MemorySink, n: int) -> list[set[str]]:
    needle = f"Message-ID: <mail.{n}@test>".encode()
    return [f for d, f in sink.boxes.get(("ann", "Sent"), []) if needle in d]


async def test_a_sent_copy_is_saved_seen_with_no_search(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.sent_copy(1)
    assert await w.filer.run_due() == 1
    assert copies(w.sink, 1) == [{"\\Seen"}]
    assert w.sink.searches == []  # saved flagged: nothing to look for afterwards
    assert [f for f in w.sink.flags("ann", "Sent")[:50] if f] == []  # nothing else touched


async def test_a_copy_filed_before_a_crash_is_flagged_from_the_rows_floor(
    tmp_path: Path,
) -> None:
    """An older version, or a crash, can leave a copy in Sent unflagged with its row FILED:
    the flag is added by a search from the floor read before the row existed."""
    w = World(tmp_path)
    w.sent_copy(1)
    await w.filer.run_due()  # reads Sent's UIDNEXT (51) at second 1000
    w.now += 1
    row = w.sent_copy(2)
    assert row is not None
    w.store.set_state(row, FILED)
    key = f"sent {2}".encode().ljust(16, b".").hex()
    w.sink.boxes[("ann", "Sent")].append(
        (f"{FILING_HEADER}: {key}\r\n".encode() + message(2), set())
    )
    assert await w.filer.run_due() == 1
    assert copies(w.sink, 2) == [{"\\Seen"}]
    assert w.sink.searches == [("seen", FILING_HEADER, 51)]
    assert w.store.count() == 0


async def test_the_clients_own_copy_is_found_from_a_floor_read_before_the_submission(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.sent_copy(1)
    await w.filer.run_due()  # reads Sent's UIDNEXT (51) at second 1000
    w.now += 1
    w.sent_copy(2, wait=60)  # created at 1001: the reading of 1000 came before it
    w.sink.save("Sent", message(2))  # the client saves its own copy right after the 250
    w.now += 60
    assert await w.filer.run_due() == 1
    assert len(copies(w.sink, 2)) == 1  # the client's, none filed beside it
    assert ("holds", "Message-ID", 51) in w.sink.searches
    assert w.store.count() == 0


async def test_a_copy_the_client_did_not_save_is_filed_once(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.sent_copy(1)
    await w.filer.run_due()
    w.now += 1
    w.sent_copy(2, wait=60)
    w.now += 60
    await w.filer.run_due()
    assert copies(w.sink, 2) == [{"\\Seen"}]
    assert ("holds", "Message-ID", 51) in w.sink.searches


async def test_a_reading_in_the_same_second_as_the_submission_is_not_used(
    tmp_path: Path,
) -> None:
    """A UIDNEXT read in the second the row was created may postdate the client's copy."""
    w = World(tmp_path)
    w.sent_copy(1)
    await w.filer.run_due()  # read at second 1000
    w.sink.save("Sent", message(2))  # the client's copy, saved within that same second...
    w.sent_copy(2, wait=60)  # ...by a clock that says 1000 for the submission too
    w.now += 60
    await w.filer.run_due()
    assert len(copies(w.sink, 2)) == 1
    assert ("holds", "Message-ID", 1) in w.sink.searches  # the whole folder, to be sure


async def test_without_a_reading_the_whole_folder_is_searched(tmp_path: Path) -> None:
    """After a restart nothing is known: a handed row is looked up in the whole folder."""
    w = World(tmp_path)
    row = w.sent_copy(1)
    assert row is not None
    w.store.set_state(row, HANDED)  # a crash came after handing it over
    key = f"sent {1}".encode().ljust(16, b".").hex()
    w.sink.boxes[("ann", "Sent")].append(
        (f"{FILING_HEADER}: {key}\r\n".encode() + message(1), set())
    )
    fresh = Filer(w.store, clock=FakeClock(w.now + 5), sink=w.sink)
    assert await fresh.run_due() == 1
    assert len(copies(w.sink, 1)) == 1  # found, not filed twice
    assert w.sink.searches[0] == ("holds", FILING_HEADER, 1)
