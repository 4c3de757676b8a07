"""The IMAP gateway over a real socket on 127.0.0.1, driven by Python's imaplib only.

The server runs in its own thread and event loop, as it does inside a node; mail is filed
into the store on that loop (as the sync code does), and the tests act as mail clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import imaplib
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.imap import ImapServer, start_imap
from gateway.imap import folders as imap_folders
from gateway.throttle import LoginThrottle
from gateway.tls import ca_path, server_context
from onionpost.config import GatewayConfig
from onionpost.store.accounts import AccountStore, ScryptCost
from onionpost.store.db import Database
from onionpost.store.mailbox import MailboxStore

USER, PASSWORD = "alice", "correct horse battery"
ADDRESS = "alice@" + "a" * 56 + ".onion"
CHEAP = ScryptCost(n=1 << 10, r=8, p=1)  # the server is under test here, not scrypt
T = TypeVar("T")


def mail(subject: str, msg_id: str, body: bytes = b"hello\r\n", extra: bytes = b"") -> bytes:
    return (
        (
            f"From: Bob <bob@{'b' * 56}.onion>\r\nTo: {ADDRESS}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: {msg_id}\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


class Gateway:
    """A real gateway (store, accounts, TLS, IMAP) on its own loop thread."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.tls_dir = root / "tls"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.config = GatewayConfig(imap_port=0, **config)
        self.throttle = LoginThrottle(base=0.05, cap=0.4)
        self.db: Database
        self.mailbox: MailboxStore
        self.accounts: AccountStore
        self.server: ImapServer
        self.call(self._open)
        self.run(self._start())

    def _open(self) -> None:
        self.db = Database(self.root / "device.db", ["mailbox", "accounts"])
        self.mailbox = MailboxStore(self.db)
        self.accounts = AccountStore(self.db, cost=CHEAP)
        if USER not in self.accounts.users():
            self.accounts.add(USER, ADDRESS, PASSWORD)
        self.mailbox.ensure_user(USER)

    async def _start(self) -> None:
        self.server = await start_imap(
            self.config, self.mailbox, self.accounts, server_context(self.tls_dir), self.throttle
        )

    @property
    def port(self) -> int:
        return self.server.port

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the server's loop thread, where the database is used."""

        async def wrapper() -> T:
            return fn(*args, **kwargs)

        return self.run(wrapper())  # type: ignore[no-any-return]

    def file(self, folder: str, message: bytes, **kwargs: Any) -> int | None:
        kwargs.setdefault("internal_date", int(time.time()))
        return self.call(self.mailbox.file_message, USER, folder, message, **kwargs)

    def client(self) -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        conn.login(USER, PASSWORD)
        return conn

    def stop(self) -> None:
        self.run(self.server.stop())
        self.call(self.db.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path)
    yield gw
    gw.stop()


@pytest.fixture
def imap(gateway: Gateway) -> Iterator[imaplib.IMAP4]:
    conn = gateway.client()
    yield conn
    with contextlib.suppress(imaplib.IMAP4.error, OSError):
        conn.logout()


def ok(result: tuple[str, list[Any]]) -> list[Any]:
    typ, data = result
    assert typ == "OK", data
    return data


def code(conn: imaplib.IMAP4, name: str) -> str:
    data = conn.response(name)[1]
    assert data and data[-1] is not None, f"no [{name}] in the response"
    value = data[-1]
    return value.decode() if isinstance(value, bytes) else str(value)


# -- login and greeting -----------------------------------------------------------------


def test_greeting_does_not_name_the_host(gateway: Gateway) -> None:
    conn = imaplib.IMAP4("127.0.0.1", gateway.port, timeout=10)
    try:
        welcome = conn.welcome.decode()
        assert "onionpost IMAP gateway ready" in welcome
        for name in {socket.gethostname(), socket.getfqdn()} - {"localhost"}:
            assert name not in welcome
    finally:
        conn.shutdown()


def test_login_ok_and_wrong_password(gateway: Gateway) -> None:
    conn = imaplib.IMAP4("127.0.0.1", gateway.port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error) as wrong:
        conn.login(USER, "wrong password")
    text = str(wrong.value)
    assert "[AUTHENTICATIONFAILED]" in text
    assert "user name or password is wrong" in text
    assert "Traceback" not in text
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        conn.login("mallory", PASSWORD)
    ok(conn.login(ADDRESS, PASSWORD))  # the whole address works as a login name too
    conn.logout()


def test_failed_logins_back_off_are_logged_and_the_owner_gets_in(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    took = []
    for i in range(4):  # a fresh connection each time, as a guesser would
        conn = imaplib.IMAP4("127.0.0.1", gateway.port, timeout=30)
        began = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login(USER, f"guess number {i}")
        took.append(time.monotonic() - began)
        conn.shutdown()
    for seconds, at_least in zip(took, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert seconds >= at_least * 0.9  # each answer waits out the doubling delay
    failures = [r for r in caplog.records if "failed login" in r.getMessage()]
    assert len(failures) == 4 and all(r.name == "gateway.imap" for r in failures)
    assert all("'alice'" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in failures)
    assert "guess number" not in caplog.text
    # the same throttle serves SMTP in a running node: the count holds for both protocols
    assert gateway.throttle.failures(USER, "127.0.0.1") == 4
    conn = gateway.client()  # the right password works after the delay ...
    conn.logout()
    assert gateway.throttle.failures(USER, "127.0.0.1") == 0  # ... and clears the count


def test_authenticate_plain(gateway: Gateway) -> None:
    conn = imaplib.IMAP4("127.0.0.1", gateway.port, timeout=10)
    token = f"\0{USER}\0{PASSWORD}".encode()
    ok(conn.authenticate("PLAIN", lambda _: token))
    ok(conn.select("INBOX"))
    conn.logout()


def test_default_password_cost_logs_in(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    try:
        gw.call(AccountStore(gw.db).set_password, USER, "strong one")  # the real cost
        conn = imaplib.IMAP4("127.0.0.1", gw.port, timeout=10)
        ok(conn.login(USER, "strong one"))
        conn.logout()
    finally:
        gw.stop()


# -- folders ----------------------------------------------------------------------------


def test_list_shows_special_use(imap: imaplib.IMAP4) -> None:
    caps = ok(imap.capability())[0].decode().split()
    for cap in ("SPECIAL-USE", "UIDPLUS", "MOVE", "IDLE"):
        assert cap in caps
    lines = [line.decode() for line in ok(imap.list())]
    attrs = {line.rsplit(" ", 1)[1]: line for line in lines}
    for name, use in [("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                      ("Junk", "\\Junk"), ("Archive", "\\Archive")]:  # fmt: skip
        assert use in attrs[name]
    assert "INBOX" in attrs


def test_create_rename_delete_folders(imap: imaplib.IMAP4) -> None:
    ok(imap.create("Work"))
    ok(imap.create("Work/Projects"))
    ok(imap.rename("Work", "Jobs"))
    names = [line.decode().rsplit(" ", 1)[1] for line in ok(imap.list())]
    assert "Jobs/Projects" in names
    assert "Work" not in names
    typ, data = imap.select("Work")
    assert typ == "NO"
    assert b"NONEXISTENT" in data[0]
    typ, data = imap.delete("Sent")
    assert typ == "NO"
    assert b"[CANNOT]" in data[0]
    assert b"standard folders" in data[0]
    ok(imap.delete("Jobs/Projects"))
    typ, data = imap.create('"bad*name"')
    assert typ == "NO"


def test_uidvalidity_is_stable_across_restarts(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    gw.file("INBOX", mail("one", "<1@x>"))
    conn = gw.client()
    ok(conn.select("INBOX"))
    first = code(conn, "UIDVALIDITY")
    conn.logout()
    gw.stop()
    gw = Gateway(tmp_path)
    try:
        conn = gw.client()
        ok(conn.select("INBOX"))
        assert code(conn, "UIDVALIDITY") == first
        assert ok(conn.uid("SEARCH", "ALL"))[0] == b"1"
        conn.logout()
    finally:
        gw.stop()


# -- messages ---------------------------------------------------------------------------


def test_append_returns_appenduid_and_sent_is_deduplicated(
    gateway: Gateway, imap: imaplib.IMAP4
) -> None:
    synced = mail("report", "<r1@alice.onion>", b"copy filed from the other device\r\n")
    gateway.file("Sent", synced)
    fcc = mail("report", "<r1@alice.onion>", b"Thunderbird's Fcc copy\r\n")
    data = ok(imap.append("Sent", "(\\Seen)", None, fcc))
    validity, uid = re.search(rb"APPENDUID (\d+) (\d+)", data[0]).groups()  # type: ignore[union-attr]
    assert uid == b"1"  # the copy that was already there
    ok(imap.select("Sent"))
    assert code(imap, "UIDVALIDITY") == validity.decode()
    assert ok(imap.search(None, "ALL")) == [b"1"]
    assert b"\\Seen" in ok(imap.fetch("1", "(FLAGS)"))[0]
    draft = mail("draft", "<d1@alice.onion>")
    data = ok(imap.append("Drafts", "(\\Draft)", None, draft))
    assert b"APPENDUID" in data[0]
    ok(imap.select("Drafts"))
    fetched = ok(imap.fetch("1", "(FLAGS BODY.PEEK[])"))
    assert b"\\Draft" in fetched[0][0]
    assert fetched[0][1] == draft


def test_fetch_flags_keywords_search_and_expunge(gateway: Gateway, imap: imaplib.IMAP4) -> None:
    for i in range(1, 6):
        gateway.file("INBOX", mail(f"message {i}", f"<m{i}@x>", f"body {i}\r\n".encode()))
    ok(imap.select("INBOX"))
    ok(imap.store("2", "+FLAGS", "(\\Flagged $label1 $Forwarded)"))
    ok(imap.store("3", "+FLAGS", "(\\Seen)"))
    flags = ok(imap.fetch("2", "(FLAGS)"))[0]
    assert b"$label1" in flags
    assert b"$Forwarded" in flags
    assert ok(imap.search(None, "FLAGGED")) == [b"2"]
    assert ok(imap.search(None, "KEYWORD", "$label1")) == [b"2"]
    assert ok(imap.search(None, "UNSEEN")) == [b"1 2 4 5"]
    assert ok(imap.search(None, "SUBJECT", '"message 4"')) == [b"4"]
    assert ok(imap.search(None, "BODY", '"body 5"')) == [b"5"]
    assert ok(imap.uid("SEARCH", "UID", "2:3")) == [b"2 3"]
    ok(imap.store("1", "-FLAGS", "(\\Seen)"))
    ok(imap.store("1:2", "+FLAGS.SILENT", "(\\Deleted)"))
    expunged = ok(imap.expunge())
    assert expunged == [b"2", b"1"] or expunged == [b"1", b"1"]
    assert ok(imap.search(None, "ALL")) == [b"1 2 3"]
    ok(imap.select("INBOX"))
    perm = code(imap, "PERMANENTFLAGS")
    assert "\\*" in perm
    flags_line = imap.response("FLAGS")[1][-1].decode()
    assert "\\*" not in flags_line


def test_uid_move_and_copyuid(gateway: Gateway, imap: imaplib.IMAP4) -> None:
    for i in range(3):
        gateway.file("INBOX", mail(f"m{i}", f"<mv{i}@x>"))
    ok(imap.select("INBOX"))
    ok(imap.uid("COPY", "1", "Trash"))
    assert re.fullmatch(r"\d+ 1 1", code(imap, "COPYUID"))
    ok(imap.uid("MOVE", "2:3", "Archive"))
    assert re.fullmatch(r"\d+ 2:3 1:2", code(imap, "COPYUID"))
    assert ok(imap.uid("SEARCH", "ALL")) == [b"1"]
    ok(imap.select("Archive"))
    subjects = ok(imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    assert [s[1].strip() for s in subjects if isinstance(s, tuple)] == [
        b"Subject: m1",
        b"Subject: m2",
    ]


# Hostile content: each of these breaks pymap's ENVELOPE or BODYSTRUCTURE unless handled.
def _nested(depth: int) -> bytes:
    body = b"leaf\r\n"
    for level in range(depth, 0, -1):
        body = (
            b"Content-Type: multipart/mixed; boundary=n%d\r\n\r\n--n%d\r\n" % (level, level)
            + body
            + b"\r\n--n%d--\r\n" % level
        )
    return mail("deep", "<deep@x>", b"--n0\r\n" + body + b"--n0--\r\n",
                b"Content-Type: multipart/mixed; boundary=n0\r\n")  # fmt: skip


HOSTILE = {
    "two senders": mail("s", "<h1@x>", extra=b"Sender: x@y.z, q@r.s\r\n"),
    "latin-1 subject": mail("s", "<h2@x>").replace(b"Subject: s", b"Subject: h\xe9"),
    "bad encoded words": mail("=?bogus?Q?h=E9?= =?utf-8?B?!!!?=", "<h3@x>"),
    "bad body charset": mail("s", "<h4@x>", b"\xe9t\xe9\r\n",
                             b"Content-Type: text/plain; charset=x-nonsense\r\n"),
    "200 KB header": mail("x" * 200_000, "<h5@x>"),
    "100-deep MIME": _nested(100),
    "bad date": mail("s", "<h6@x>").replace(b"Mon, 01 Jan 2024 10:00:00 +0000", b"yesterday"),
    "nested bad sender": mail("s", "<h7@x>", b"From: x@y\r\nSender: a@b, c@d\r\n\r\ninner\r\n",
                              b"Content-Type: message/rfc822\r\n"),
    "NUL and controls": mail("a\x00b\x07c", "<h8@x>", b"bo\x00dy\r\n"),
    "empty group": mail("s", "<h9@x>").replace(b"To: ", b"To: undisclosed-recipients:;\r\nCc: "),
    "base64 garbage": mail("s", "<h10@x>", b"!!!not base64!!!\r\n",
                           b"Content-Transfer-Encoding: base64\r\n"),
}  # fmt: skip


@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "raw"])
def test_hostile_messages_cannot_break_a_session(
    gateway: Gateway, imap: imaplib.IMAP4, normalize: bool
) -> None:
    """Filed through file_message (normalised), and raw as if filed by an older version."""
    for message in HOSTILE.values():
        assert gateway.file("INBOX", message, normalize=normalize) is not None
    ok(imap.select("INBOX"))
    count = len(HOSTILE)
    for seq, name in enumerate(HOSTILE, 1):
        for items in ("(ENVELOPE)", "(BODYSTRUCTURE)", "(BODY)", "(RFC822.SIZE BODY.PEEK[])",
                      "(BODY.PEEK[1] BINARY.PEEK[1] BODY.PEEK[1.MIME])",
                      "(BODY.PEEK[HEADER.FIELDS (FROM SENDER SUBJECT DATE)])"):  # fmt: skip
            typ, data = imap.fetch(str(seq), items)
            assert typ == "OK", (name, items, data)
        ok(imap.noop())
    ok(imap.search(None, "FROM", "bob"))
    ok(imap.search(None, "TEXT", "hello"))
    ok(imap.search(None, "HEADER", "Sender", "x"))
    fetched = ok(imap.fetch(f"1:{count}", "(ENVELOPE BODYSTRUCTURE)"))
    starts = [item[0] if isinstance(item, tuple) else item for item in fetched]
    assert len([s for s in starts if re.match(rb"\d+ \(ENVELOPE", s)]) == count


def test_a_failing_command_answers_no_and_the_session_goes_on(
    gateway: Gateway, imap: imaplib.IMAP4, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.file("INBOX", mail("x", "<f1@x>"))
    ok(imap.select("INBOX"))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(gateway.mailbox, "deleted_uids", broken)
    typ, data = imap.expunge()
    assert typ == "NO"
    assert b"[SERVERBUG]" in data[0]
    assert b"session continues" in data[0]
    ok(imap.noop())
    ok(imap.fetch("1", "(FLAGS)"))


@pytest.mark.slow
def test_a_large_message(
    gateway: Gateway, imap: imaplib.IMAP4, monkeypatch: pytest.MonkeyPatch
) -> None:
    attachment = os.urandom(30 << 20).hex().encode()[: 30 << 20]
    message = mail("large", "<large@x>", attachment + b"\r\n")
    gateway.file("INBOX", message)
    ok(imap.select("INBOX"))
    read_whole: list[int] = []
    content = gateway.mailbox.content

    def recording_content(body_id: int) -> bytes:
        read_whole.append(body_id)
        return content(body_id)

    monkeypatch.setattr(gateway.mailbox, "content", recording_content)
    head = ok(imap.fetch("1", "(RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    assert f"RFC822.SIZE {len(message)}".encode() in head[0][0]
    assert b"Subject: large" in head[0][1]
    assert read_whole == []  # the header path does not read the 30 MiB
    body = ok(imap.fetch("1", "(BODY.PEEK[])"))[0][1]
    assert body == message
    assert len(read_whole) == 1


# -- IDLE -------------------------------------------------------------------------------


class Idler:
    """IDLE by hand (imaplib has no idle() before Python 3.14)."""

    def __init__(self, conn: imaplib.IMAP4) -> None:
        self.conn = conn
        conn.sock.settimeout(60)  # only so that a missing update cannot hang the test
        conn.send(b"I1 IDLE\r\n")
        assert conn.readline().startswith(b"+")

    def next_line(self) -> bytes:
        return self.conn.readline()

    def done(self) -> None:
        self.conn.send(b"DONE\r\n")
        while not (line := self.conn.readline()).startswith(b"I1 "):
            pass
        assert line.startswith(b"I1 OK")


@pytest.fixture
def no_idle_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """IDLE's fallback re-check comes only after an hour: what arrives came from a commit's
    notification (which announces new mail within milliseconds, however busy the machine)."""
    monkeypatch.setattr(imap_folders, "POLL_SECONDS", 3600.0)


@pytest.mark.usefixtures("no_idle_poll")
def test_idle_announces_new_mail_as_it_is_filed(gateway: Gateway, imap: imaplib.IMAP4) -> None:
    gateway.file("INBOX", mail("before", "<i0@x>"))
    ok(imap.select("INBOX"))
    idler = Idler(imap)
    latencies = []
    for n in range(2, 7):
        time.sleep(0.2)
        filed_at = time.monotonic()
        gateway.file("INBOX", mail(f"new {n}", f"<i{n}@x>"))
        while (line := idler.next_line()) and b"EXISTS" not in line:
            pass
        latencies.append(time.monotonic() - filed_at)
        assert line.strip() == b"* %d EXISTS" % n
    idler.done()
    print(f"\nIDLE push latency: max {max(latencies) * 1000:.1f} ms, "
          f"median {sorted(latencies)[2] * 1000:.1f} ms")  # fmt: skip


@pytest.mark.usefixtures("no_idle_poll")
def test_idle_sees_changes_made_by_another_session(gateway: Gateway, imap: imaplib.IMAP4) -> None:
    gateway.file("INBOX", mail("x", "<o1@x>"))
    ok(imap.select("INBOX"))
    other = gateway.client()
    ok(other.select("INBOX"))
    idler = Idler(imap)
    ok(other.store("1", "+FLAGS", "(\\Flagged)"))
    line = idler.next_line()
    assert b"FETCH" in line
    assert b"\\Flagged" in line
    ok(other.store("1", "+FLAGS", "(\\Deleted)"))
    idler.next_line()
    ok(other.expunge())
    assert idler.next_line().strip() == b"* 1 EXPUNGE"
    idler.done()
    other.logout()


# -- TLS --------------------------------------------------------------------------------


def test_starttls_with_the_local_ca(gateway: Gateway) -> None:
    conn = imaplib.IMAP4("127.0.0.1", gateway.port, timeout=10)
    context = ssl.create_default_context(cafile=str(ca_path(gateway.tls_dir)))
    ok(conn.starttls(context))
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    ok(conn.login(USER, PASSWORD))
    ok(conn.select("INBOX"))
    conn.logout()


def test_starttls_is_refused_without_trusting_the_ca(gateway: Gateway) -> None:
    conn = imaplib.IMAP4("127.0.0.1", gateway.port, timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.starttls(ssl.create_default_context())
    with contextlib.suppress(OSError):
        conn.shutdown()
    gateway.client().logout()  # the server is unaffected


def test_require_tls_means_no_plaintext_login(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, require_tls=True)
    try:
        conn = imaplib.IMAP4("127.0.0.1", gw.port, timeout=10)
        assert "LOGINDISABLED" in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            conn._simple_command("LOGIN", USER, PASSWORD)  # imaplib refuses on its own
        ok(conn.starttls(ssl.create_default_context(cafile=str(ca_path(gw.tls_dir)))))
        ok(conn.login(USER, PASSWORD))
        conn.logout()
    finally:
        gw.stop()


# -- load -------------------------------------------------------------------------------


@pytest.mark.slow
def test_200_concurrent_sessions(gateway: Gateway) -> None:
    for i in range(20):
        gateway.file("INBOX", mail(f"m{i}", f"<c{i}@x>"))
    sessions = 200
    barrier = threading.Barrier(sessions + 1, timeout=120)

    def session(n: int) -> int:
        conn = gateway.client()
        try:
            ok(conn.select("INBOX"))
            fetched = ok(conn.fetch("1:*", "(FLAGS ENVELOPE)"))
            barrier.wait()  # all sessions open at the same time
            ok(conn.noop())
            ok(conn.store(str(n % 20 + 1), "+FLAGS", "(\\Seen)"))
            barrier.wait()
            return len(fetched)
        finally:
            conn.logout()

    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        futures = [pool.submit(session, n) for n in range(sessions)]
        barrier.wait()
        probe = gateway.client()
        started = time.monotonic()
        ok(probe.select("INBOX"))
        ok(probe.fetch("1:*", "(BODY.PEEK[])"))
        answered = time.monotonic() - started
        probe.logout()
        barrier.wait()
        assert [f.result(120) for f in futures] == [20] * sessions
    # The probe was served while the other sessions were all open (they log out only after
    # the second barrier, which waits for the probe); how fast depends on the machine.
    print(f"\nwith {sessions} open sessions a probe session was answered in {answered:.3f} s")
