"""Real mail clients against the node's private Dovecot: mbsync (isync) both ways, neomutt reading.

Both connect with STARTTLS and trust only the gateway's local CA, as a user's setup would.
"""

from __future__ import annotations

import mailbox
import os
import subprocess
from email.header import decode_header, make_header
from pathlib import Path

import pytest

from tests.clients.conftest import require, run_in_terminal
from tests.integration.test_imap_gateway import HOSTILE, PASSWORD, USER, Gateway, mail

pytestmark = pytest.mark.clients


def uids(gateway: Gateway, folder: str) -> dict[int, frozenset[str]]:
    """UID -> flags of a folder, read over IMAP by a session of our own (FETCH FLAGS)."""
    return gateway.flags(folder)


# -- mbsync ---------------------------------------------------------------------------------


def mbsyncrc(gateway: Gateway, maildir: Path) -> Path:
    # isync 1.4 matches the certificate against DNS names only, so it connects as "localhost"
    # (the gateway certificate names localhost, 127.0.0.1 and ::1).
    rc = maildir.parent / "mbsyncrc"
    rc.write_text(
        f"""IMAPAccount onion
Host localhost
Port {gateway.port}
User {USER}
Pass "{PASSWORD}"
SSLType STARTTLS
CertificateFile {gateway.tls_dir / "ca.pem"}
AuthMechs LOGIN

IMAPStore gateway
Account onion

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel onion
Far :gateway:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
""",
        encoding="utf-8",
    )
    return rc


def mbsync(rc: Path) -> None:
    result = subprocess.run(
        [require("mbsync", "isync"), "-c", str(rc), "-a"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def local_files(maildir: Path, folder: str) -> dict[int, Path]:
    """Maildir messages by the far-side UID that mbsync writes into file names (,U=n)."""
    found: dict[int, Path] = {}
    for sub in ("cur", "new"):
        for path in (maildir / folder / sub).glob("*"):
            uid = int(path.name.split(",U=")[1].split(":")[0])
            found[uid] = path
    return found


def set_local_flags(path: Path, flags: str) -> Path:
    target = path.parent.parent / "cur" / (path.name.split(":2,")[0] + ":2," + flags)
    path.rename(target)
    return target


def test_mbsync_two_way_sync(gateway: Gateway, tmp_path: Path) -> None:
    for i in range(3):
        gateway.file("INBOX", mail(f"inbox {i}", f"<in{i}@x>"))
    gateway.file("Sent", mail("sent", "<sent@x>"))
    maildir = tmp_path / "Mail"
    maildir.mkdir()
    rc = mbsyncrc(gateway, maildir)

    mbsync(rc)
    inbox = local_files(maildir, "INBOX")
    assert sorted(inbox) == [1, 2, 3]
    assert sorted(local_files(maildir, "Sent")) == [1]
    for folder in ("Drafts", "Trash", "Junk", "Archive"):
        assert (maildir / folder / "cur").is_dir()

    # Changes on both sides between two syncs.
    set_local_flags(inbox[1], "S")
    set_local_flags(inbox[2], "T")  # trashed locally: expunged on the server
    draft = maildir / "Drafts" / "cur" / "1700000000.1.local:2,D"
    draft.write_bytes(mail("my draft", "<draft@alice.onion>"))
    (maildir / "Projects" / "cur").mkdir(parents=True)
    (maildir / "Projects" / "new").mkdir()
    (maildir / "Projects" / "tmp").mkdir()
    (maildir / "Projects" / "cur" / "1700000000.2.local:2,S").write_bytes(
        mail("filed locally", "<local@alice.onion>")
    )
    gateway.file("INBOX", mail("arrived later", "<later@x>"))
    gateway.add_flags("INBOX", 3, "\\Flagged")  # as another client would

    mbsync(rc)
    server_inbox = uids(gateway, "INBOX")
    assert sorted(server_inbox) == [1, 3, 4]
    assert "\\Seen" in server_inbox[1]
    [draft_flags] = uids(gateway, "Drafts").values()
    assert "\\Draft" in draft_flags
    assert list(uids(gateway, "Projects").values()) == [frozenset({"\\Seen"})]
    inbox = local_files(maildir, "INBOX")
    assert sorted(inbox) == [1, 3, 4]
    assert "F" in inbox[3].name.split(":2,")[1]
    assert b"Subject: arrived later" in inbox[4].read_bytes()

    mbsync(rc)  # nothing left to do, and nothing breaks
    assert sorted(uids(gateway, "INBOX")) == [1, 3, 4]


# -- neomutt --------------------------------------------------------------------------------


def muttrc(gateway: Gateway, home: Path) -> Path:
    rc = home / "muttrc"
    rc.write_text(
        f"""set folder = "imap://{USER}@127.0.0.1:{gateway.port}/"
set imap_user = "{USER}"
set imap_pass = "{PASSWORD}"
set spoolfile = "+INBOX"
set ssl_starttls = yes
set ssl_force_tls = yes
set ssl_ca_certificates_file = "{gateway.tls_dir / "ca.pem"}"
set certificate_file = "{home / "certificates"}"
set imap_authenticators = "login"
set header_cache = ""
set message_cachedir = ""
set confirmappend = no
set confirmcreate = no
set quit = yes
set delete = yes
set mbox_type = mbox
set sort = date-sent
set wait_key = no
set sleep_time = 0
""",
        encoding="utf-8",
    )
    return rc


def neomutt(gateway: Gateway, home: Path, keys: str) -> str:
    rc = muttrc(gateway, home)
    env = {**os.environ, "TERM": "xterm", "HOME": str(home), "LANG": "C.UTF-8"}
    argv = [require("neomutt", "neomutt"), "-n", "-F", str(rc), "-e", f'push "{keys}"']
    return run_in_terminal(argv, env=env, timeout=60)


def test_neomutt_reads_saves_and_expunges(gateway: Gateway, tmp_path: Path) -> None:
    gateway.file("INBOX", mail("plain hello", "<n1@x>"))
    gateway.file("INBOX", mail("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "<n2@x>"))
    for name in ("two senders", "100-deep MIME", "200 KB header", "bad date"):
        gateway.file("INBOX", HOSTILE[name])
    home = tmp_path / "home"
    home.mkdir()
    saved = tmp_path / "saved.mbox"

    screen = neomutt(
        gateway, home, f"<tag-pattern>~A<enter><tag-prefix><copy-message>{saved}<enter><quit>"
    )
    assert "accept (o)nce" not in screen  # no prompt: the local CA was trusted
    box = mailbox.mbox(str(saved))
    try:
        subjects = [str(make_header(decode_header(m["Subject"] or ""))) for m in box]
    finally:
        box.close()
    assert len(subjects) == 6
    assert "plain hello" in subjects
    assert "Gr\u00fc\u00dfe" in subjects
    assert sorted(uids(gateway, "INBOX")) == [1, 2, 3, 4, 5, 6]

    # Delete the first message and leave: neomutt stores \Deleted and expunges.
    neomutt(gateway, home, "<first-entry><delete-message><sync-mailbox><quit>")
    remaining = uids(gateway, "INBOX")
    assert len(remaining) == 5
