"""`onionpost read` and `onionpost search` against a real private Dovecot.

A data directory's Dovecot is prepared and started as tests/integration/test_dovecot.py does,
mail of the awkward kinds (folded and encoded-word headers, multipart with a Latin-1
quoted-printable part, raw 8-bit UTF-8, an attachment, terminal escapes in a subject) is
delivered by LMTP, Dovecot is stopped (doveadm reads the Maildirs without it), and the CLI
is run through click's CliRunner.  As root, the mail belongs to Dovecot's mail account and
doveadm changes to it; the last test runs the CLI as an unprivileged owner of the data
directory.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.dovecot import DovecotServer, Installation, Layout, Settings, find_installation
from gateway.mailread import MailReader, printable
from onionpost.app.cli import cli
from onionpost.core.errors import MailServerNotInstalled
from tests.integration.test_dovecot import _as, _python_for, free_port, unprivileged_user

__all__ = ["unprivileged_user"]  # a fixture, imported for the last test

BOB = f"bob@{'b' * 56}.onion"
ALICE = f"alice@{'a' * 56}.onion"

PLAIN = (
    f"From: Bob <{BOB}>\r\nTo: {ALICE}\r\nSubject: lunch on friday\r\n"
    "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\n"
    "shall we meet at the zebra crossing?\r\n"
).encode()
FOLDED = (
    "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@example.onion>\r\n"
    f"To: {ALICE}\r\n"
    "Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n\tand a folded\r\n continuation\r\n"
    "Date: Tue, 2 Jan 2024 11:30:00 +0100\r\nMessage-ID: <2@x>\r\n\r\nbody two\r\n"
).encode()
MULTIPART = (
    f"From: carol@{'c' * 56}.onion\r\nTo: {ALICE}\r\nSubject: menu\r\n"
    "Date: Wed, 3 Jan 2024 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="OUT"\r\n\r\n'
    "--OUT\r\nContent-Type: multipart/alternative; boundary=ALT\r\n\r\n"
    "--ALT\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=E9 au lait and a giraffe\r\n"
    "--ALT\r\nContent-Type: text/html\r\n\r\n<p>Caf&eacute; au lait</p>\r\n--ALT--\r\n"
    "--OUT\r\nContent-Type: application/pdf\r\n"
    'Content-Disposition: attachment; filename="=?utf-8?q?R=C3=A9sum=C3=A9.pdf?="\r\n'
    "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--OUT--\r\n"
).encode()
EIGHT_BIT = (
    f"From: dave@{'d' * 56}.onion\r\nSubject: Äpfel\r\nDate: Thu, 4 Jan 2024 08:00:00 +0000\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Äpfel und Birnen, frisch vom Markt\r\n"
).encode()
HOSTILE = (
    f"From: eve@{'e' * 56}.onion\r\nSubject: look \x1b]0;pwned\x07 here \u202eexe.txt\r\n"
    "Date: Fri, 5 Jan 2024 08:00:00 +0000\r\n\r\nclear \x1b[2J screen\r\n"
).encode()
SENT = (
    f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: re: lunch\r\n"
    "Date: Mon, 1 Jan 2024 12:00:00 +0000\r\n\r\nyes, the zebra crossing\r\n"
).encode()


@pytest.fixture(scope="module")
def installation() -> Installation:
    try:
        return find_installation()
    except MailServerNotInstalled as exc:
        pytest.skip(f"{exc} (scripts/system-deps.sh test installs it)")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="oprd-", dir="/tmp"))
    base.chmod(0o755)  # as root, Dovecot's mail account must pass through
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _fill(installation: Installation, data: Path, users: tuple[str, ...]) -> None:
    srv = DovecotServer(Layout(data), Settings(imap_port=free_port()), installation=installation)
    for user in users:
        await srv.set_password(user, "pw")
    await srv.start()
    try:
        for raw in (PLAIN, FOLDED, MULTIPART, EIGHT_BIT, HOSTILE):
            await srv.deliver("alice", raw, sender=BOB)
        await srv.deliver("alice", SENT, folder="Sent")
    finally:
        await srv.stop()  # doveadm needs no running Dovecot


@pytest.fixture
async def mail(installation: Installation, data_dir: Path) -> AsyncIterator[Path]:
    await _fill(installation, data_dir, ("alice",))
    yield data_dir


def run(data: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--data-dir", str(data), *args])
    assert result.exit_code == code, result.output
    return result.output


def test_listing_decodes_headers_and_keeps_the_terminal_safe(mail: Path) -> None:
    out = run(mail, "read")
    lines = out.splitlines()
    assert lines[0] == "INBOX: 5 messages, 5 unread"
    assert "Jürgen Müller" in out
    assert "Grüße aus Köln and a folded continuation" in out
    assert "lunch on friday" in out and "Äpfel" in out and "menu" in out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert all(line.startswith("N ") for line in lines[1:6])
    # the newest two, oldest first
    two = run(mail, "read", "--limit", "2").splitlines()
    assert two[0] == "INBOX: 5 messages, 5 unread, showing the newest 2"
    assert "Äpfel" in two[1] and "look" in two[2]

    listing = json.loads(run(mail, "read", "--json"))
    assert listing["user"] == "alice"
    assert listing["folder"] == {"name": "INBOX", "messages": 5, "unseen": 5,
                                 "size": listing["folder"]["size"]}  # fmt: skip
    first, second = listing["messages"][:2]
    assert first["uid"] == 1 and first["seen"] is False
    assert first["from"] == f"Bob <{BOB}>" and first["to"] == ALICE
    assert first["subject"] == "lunch on friday"
    assert first["date"] == "Mon, 1 Jan 2024 10:00:00 +0000"
    assert first["size"] > len(PLAIN) // 2 and first["received"] > 0
    assert second["subject"] == "Grüße aus Köln and a folded continuation"
    assert second["from"] == "Jürgen Müller <j@example.onion>"
    # JSON keeps the text as sent (escaped by JSON itself)
    assert listing["messages"][4]["subject"].startswith("look \x1b]0;pwned\x07 here")

    folders = json.loads(run(mail, "read", "--folders", "--json"))["folders"]
    assert [f["name"] for f in folders] == ["INBOX", "Sent"]
    assert folders[1]["messages"] == 1
    assert "Sent" in run(mail, "read", "--folders")


def test_showing_a_message(mail: Path) -> None:
    out = run(mail, "read", "INBOX", "3")
    assert out.startswith(f"From: carol@{'c' * 56}.onion\nTo: {ALICE}\n")
    assert "Subject: menu\n" in out
    assert "Attachment: Résumé.pdf (application/pdf, 9 bytes)" in out
    assert "Café au lait and a giraffe" in out and "<p>" not in out

    shown = json.loads(run(mail, "read", "inbox", "3", "--json"))
    assert shown["text"].strip() == "Café au lait and a giraffe"
    assert shown["text_from"] == "text/plain"
    assert shown["attachments"] == [
        {"filename": "Résumé.pdf", "content_type": "application/pdf", "size": 9}
    ]
    assert shown["headers"]["date"] == "Wed, 3 Jan 2024 09:00:00 +0000"

    eight = json.loads(run(mail, "read", "INBOX", "4", "--json"))
    assert eight["headers"]["subject"] == "Äpfel"
    assert eight["text"] == "Äpfel und Birnen, frisch vom Markt\n"

    hostile = run(mail, "read", "INBOX", "5")
    assert "\x1b" not in hostile and "\u202e" not in hostile and "clear" in hostile

    # --raw: the message as stored (Dovecot stores LF line ends below LMTP's Return-Path)
    raw = CliRunner().invoke(cli, ["--data-dir", str(mail), "read", "INBOX", "4", "--raw"])
    assert raw.exit_code == 0
    assert raw.stdout_bytes == f"Return-Path: <{BOB}>\n".encode() + EIGHT_BIT.replace(
        b"\r\n", b"\n"
    )
    # Reading leaves it unread; --mark-read marks it.
    assert not json.loads(run(mail, "read", "INBOX", "4", "--json"))["seen"]
    run(mail, "read", "INBOX", "4", "--mark-read")
    assert json.loads(run(mail, "read", "INBOX", "4", "--json"))["seen"]
    unread = json.loads(run(mail, "read", "--unread", "--json"))["messages"]
    assert [m["uid"] for m in unread] == [1, 2, 3, 5]


def test_search_finds_body_and_subject_words(mail: Path) -> None:
    found = json.loads(run(mail, "search", "zebra", "--json"))["messages"]
    assert sorted((m["folder"], m["uid"]) for m in found) == [("INBOX", 1), ("Sent", 1)]
    in_inbox = json.loads(run(mail, "search", "zebra", "--folder", "inbox", "--json"))
    assert [(m["folder"], m["uid"]) for m in in_inbox["messages"]] == [("INBOX", 1)]
    # every word must match; encoded words, Latin-1 and 8-bit bodies are searched decoded
    assert _uids(mail, "search", "zebra", "crossing", "friday") == [1]
    assert _uids(mail, "search", "zebra", "nowhere") == []
    assert _uids(mail, "search", "--in", "subject", "grüße") == [2]
    assert _uids(mail, "search", "--in", "body", "café") == [3]
    assert _uids(mail, "search", "birnen") == [4]
    assert _uids(mail, "search", "--in", "from", "jürgen") == [2]
    assert _uids(mail, "search", "--in", "subject", "zebra") == []
    # words are words, never options or search syntax
    assert _uids(mail, "search", "--", "-f") == []
    assert _uids(mail, "search", "OR", "(") == []
    out = run(mail, "search", "giraffe")
    assert "INBOX 3" in out and "menu" in out and "1 found" in out
    assert "Nothing found." in run(mail, "search", "unicorn")


def _uids(data: Path, *args: str) -> list[int]:
    command, *rest = args
    return sorted(m["uid"] for m in json.loads(run(data, command, "--json", *rest))["messages"])


async def test_clear_errors(installation: Installation, data_dir: Path) -> None:
    missing = data_dir.parent / "nothing-here"
    assert "There is no onionpost data directory" in run(missing, "read", code=1)
    data_dir.mkdir()
    assert "has no mail server configuration yet" in run(data_dir, "read", code=1)
    await _fill(installation, data_dir, ("alice", "bob"))
    assert "Say whose mail to read with --user" in run(data_dir, "read", code=1)
    assert "There is no mail user 'mallory'" in run(data_dir, "read", "--user", "mallory",
                                                     code=1)  # fmt: skip
    out = run(data_dir, "read", "Nope", "--user", "alice", code=1)
    assert out.strip() == "onionpost: alice has no folder 'Nope'; the folders are INBOX, Sent."
    assert "no message 99" in run(data_dir, "read", "INBOX", "99", "--user", "alice", code=1)
    assert "no folder 'Nope'" in run(data_dir, "search", "x", "--folder", "Nope",
                                     "--user", "alice", code=1)  # fmt: skip
    # bob has a password but no mail yet (no Maildir): an empty INBOX, nothing created
    assert "INBOX: 0 messages" in run(data_dir, "read", "--user", "bob")
    assert not Layout(data_dir).maildir("bob").exists()
    assert "Traceback" not in run(data_dir, "read", "--raw", code=2)


def test_an_inbox_only_node_says_where_mail_is_read(tmp_path: Path) -> None:
    (tmp_path / "onionpost.toml").write_text('role = "inbox"\n')
    assert "This machine is an inbox only" in run(tmp_path, "read", code=1)


CHILD = """
import asyncio, sys
from pathlib import Path
if sys.argv[2:] == ["fill"]:
    from gateway.dovecot import find_installation
    from tests.integration.test_read_cli import _fill
    asyncio.run(_fill(find_installation(), Path(sys.argv[1]), ("alice",)))
else:
    from onionpost.app.cli import main
    sys.argv = ["onionpost", "--data-dir", sys.argv[1], *sys.argv[2:]]
    main()
"""


async def test_as_the_unprivileged_owner_of_the_data_directory(
    installation: Installation, unprivileged_user: str
) -> None:
    """An unprivileged node's owner reads its own mail; root reads it too, as that owner."""
    python = _python_for(unprivileged_user)
    base = Path(tempfile.mkdtemp(prefix="oprd-user-", dir="/tmp"))
    try:
        base.chmod(0o755)
        data = base / "data"
        data.mkdir(mode=0o700)
        script = base / "child.py"
        script.write_text(CHILD)
        script.chmod(0o644)
        if os.geteuid() == 0:
            account = pwd.getpwnam(unprivileged_user)
            os.chown(data, account.pw_uid, account.pw_gid)

        def child(*args: str) -> subprocess.CompletedProcess[str]:
            argv = _as(unprivileged_user, [*python, str(script), str(data), *args])
            return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

        done = child("fill")  # the node runs as its owner: so does its Dovecot
        assert done.returncode == 0, done.stdout + done.stderr
        owner = pwd.getpwnam(unprivileged_user).pw_uid
        assert Layout(data).maildir("alice").stat().st_uid == owner

        done = child("search", "--json", "giraffe")
        assert done.returncode == 0, done.stdout + done.stderr
        assert [m["uid"] for m in json.loads(done.stdout)["messages"]] == [3]
        done = child("read", "INBOX", "2", "--mark-read")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Subject: Grüße aus Köln and a folded continuation" in done.stdout
        # root reads the same mail, as the owner: nothing in the Maildir becomes root's
        reader = MailReader(Layout(data))
        assert reader.uid == owner
        assert [m.uid for m in reader.messages(unread=True)] == [1, 3, 4, 5]
        for path in Layout(data).maildir("alice").rglob("*"):
            assert path.stat().st_uid == owner, path
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_printable_removes_what_a_terminal_would_obey() -> None:
    assert printable("a\x1b[2Jb\tc\u202ed") == "a\ufffd[2Jb c\ufffdd"
    assert printable("one\ntwo\r\n", keep_newlines=True) == "one\ntwo\n"
    assert printable("one\ntwo") == "one two"
