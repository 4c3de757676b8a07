#!/usr/bin/env python3
"""Regenerate the screenshots of docs/thunderbird.md (not part of the test suite).

    .venv/bin/python docs/images/make-thunderbird-screenshots.py

What it does, all on 127.0.0.1 and in a temporary directory that it removes afterwards:

1. starts a node (``onionpost init --user alice``, ``users add carol`` and ``bob``, with
   ``[tor] mode = "off"``) and has carol and bob send alice a few messages;
2. starts Xvfb and, on it, a real (not headless) Thunderbird whose profile holds the local CA
   (trusted, as in Manage Certificates > Authorities > Import), alice's saved password and the
   ``user.js`` that ``onionpost thunderbird --write`` generated, plus one extra pref the guide
   recommends (``mailnews.headers.extraExpandedHeaders = "X-Onionpost-Verified"``);
3. takes three pictures with ImageMagick's ``import`` and makes them small with ``convert``:
   ``thunderbird-folders.png`` (the account and its folders), ``thunderbird-verified.png``
   (a message from carol with its X-Onionpost-Verified line) and
   ``thunderbird-compose.png`` (writing to carol's .onion address);
4. starts Thunderbird once more with a profile that lacks the CA, for the warning that shows:
   ``thunderbird-untrusted-ca.png``.

Needs the Debian packages thunderbird, xvfb and imagemagick (``apt-get install -y thunderbird
xvfb imagemagick``), and the project's virtual environment (for marionette_driver).  It reuses
the node and Thunderbird helpers of tests/clients/test_thunderbird_flow.py.
"""

# ruff: noqa: S603 -- runs only the fixed programs Xvfb, import and convert

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from tests.clients.test_thunderbird_flow import (  # noqa: E402
    SEND,
    Node,
    Thunderbird,
    wait_for,
)

WIDTH, HEIGHT = 1280, 800
#: Shown in the message header pane for every message: the guide recommends this pref.
EXTRA_PREFS = 'user_pref("mailnews.headers.extraExpandedHeaders", "X-Onionpost-Verified");\n'

INBOX = [
    ("carol", "Lunch on Saturday?", "Hi Alice,\n\nshall we have lunch on Saturday? Noon at the "
     "usual place.\n\nCarol\n"),
    ("bob", "The garden photos", "Alice,\n\nthe photos are on the shared drive, folder "
     "'garden'.\n\nBob\n"),
    ("carol", "Re: the book club", "I have finished the book. See you on Thursday!\n\nCarol\n"),
]  # fmt: skip

WINDOW = """
const [name] = arguments;
const win = Services.wm.getMostRecentWindow(name);
if (!win || win.document.readyState != "complete") return null;
return {x: win.screenX, y: win.screenY, width: win.outerWidth, height: win.outerHeight};
"""

SHOW_MESSAGE = """
// Select the folder in the folder pane and the message in the list, as a click does.
const [folderName, messageId] = arguments;
const win = Services.wm.getMostRecentWindow("mail:3pane");
const about3Pane = win.document.getElementById("tabmail").currentAbout3Pane;
const root = MailServices.accounts.defaultAccount.incomingServer.rootFolder;
const folder = root.getChildNamed(folderName);
about3Pane.displayFolder(folder.URI);
if (messageId) {
  const hdr = folder.msgDatabase.getMsgHdrForMessageID(messageId);
  about3Pane.selectMessage(hdr);
}
return true;
"""

LAYOUT = """
// A folder pane wide enough for the account name; returns the screen rectangles of the panes.
const win = Services.wm.getMostRecentWindow("mail:3pane");
const about3Pane = win.document.getElementById("tabmail").currentAbout3Pane;
const doc = about3Pane.document;
doc.getElementById("folderPaneSplitter").width = 330;
const rect = id => {
  const r = doc.getElementById(id).getBoundingClientRect();
  const [x, y] = [about3Pane.mozInnerScreenX + r.x, about3Pane.mozInnerScreenY + r.y];
  return [x, y, r.width, r.height].map(Math.round);
};
return {folderPane: rect("folderPane"), threadPane: rect("threadPane"),
        messagePane: rect("messagePane"),
        status: win.document.getElementById("statusText").value};
"""

COMPOSE = """
// Open the compose window as Write does, already filled in.
const [to, subject, body] = arguments;
const identity = MailServices.accounts.defaultAccount.defaultIdentity;
const fields = Cc["@mozilla.org/messengercompose/composefields;1"]
  .createInstance(Ci.nsIMsgCompFields);
fields.to = to;
fields.subject = subject;
fields.body = body;
const params = Cc["@mozilla.org/messengercompose/composeparams;1"]
  .createInstance(Ci.nsIMsgComposeParams);
params.composeFields = fields;
params.identity = identity;
params.type = Ci.nsIMsgCompType.New;
params.format = Ci.nsIMsgCompFormat.PlainText;
MailServices.compose.OpenComposeWindowWithParams(null, params);
"""

COMPOSE_READY = """
const win = Services.wm.getMostRecentWindow("msgcompose");
if (!win || win.document.readyState != "complete" || !win.gMsgCompose) return null;
win.moveTo(40, 30);
win.resizeTo(1000, 680);
return true;
"""


def need(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        sys.exit(f"{program} is missing: apt-get install -y {package}")
    return path


@contextlib.contextmanager
def xvfb() -> contextlib.Generator[str, None, None]:
    """An X server of our own; yields its DISPLAY."""
    read, write = os.pipe()
    proc = subprocess.Popen(
        [need("Xvfb", "xvfb"), "-displayfd", str(write), "-screen", "0",
         f"{WIDTH}x{HEIGHT}x24", "-nolisten", "tcp"],
        pass_fds=[write], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write)
    with os.fdopen(read) as pipe:
        display = ":" + pipe.readline().strip()
    try:
        yield display
    finally:
        proc.terminate()
        proc.wait(10)


def shoot(display: str, name: str, crop: tuple[int, int, int, int] | None, width: int) -> Path:
    """Screenshot the screen, crop to (x, y, w, h), scale to ``width`` and reduce the colours."""
    raw = OUT / f".{name}.raw.png"
    subprocess.run(
        [need("import", "imagemagick"), "-display", display, "-window", "root", str(raw)],
        check=True,
    )
    target = OUT / f"thunderbird-{name}.png"
    args = [need("convert", "imagemagick"), str(raw)]
    if crop:
        x, y, w, h = crop
        args += ["-crop", f"{w}x{h}+{x}+{y}", "+repage"]
    args += ["-resize", f"{width}x>", "-strip", "-colors", "256", f"PNG8:{target}"]
    subprocess.run(args, check=True)
    raw.unlink()
    print(f"{target.relative_to(REPO)}: {target.stat().st_size // 1024} KB")
    return target


def untrusted_ca_warning(root: Path, display: str, user_js: str) -> None:
    """What a profile without the local CA shows at its first connection."""
    tb = Thunderbird(root / "thunderbird-without-ca", headless=False, env={"DISPLAY": display})
    try:
        tb.start(user_js, connect=False)  # the modal warning would block Marionette
        wait_for("the certificate error", tb.imap_problems, timeout=60, explain=tb.evidence)
        time.sleep(3)
        raw = OUT / ".untrusted.raw.png"
        subprocess.run(
            [need("import", "imagemagick"), "-display", display, "-window", "root", str(raw)],
            check=True,
        )
        # The warning sits in the middle of the window: cut the window out of the black
        # screen (-trim), then the middle out of the window.
        target = OUT / "thunderbird-untrusted-ca.png"
        subprocess.run(
            [need("convert", "imagemagick"), str(raw), "-bordercolor", "black", "-border", "1",
             "-trim", "+repage", "-gravity", "center", "-crop", "700x170+0+0", "+repage",
             "-strip", "-colors", "256", f"PNG8:{target}"],
            check=True,
        )  # fmt: skip
        raw.unlink()
        print(f"{target.relative_to(REPO)}: {target.stat().st_size // 1024} KB")
    finally:
        tb.remove()


def main() -> None:
    need("thunderbird", "thunderbird")
    with tempfile.TemporaryDirectory(prefix="onionpost-shots-") as tmp, xvfb() as display:
        root = Path(tmp)
        node = Node(root)
        tb: Thunderbird | None = None
        try:
            for user in ("alice", "carol", "bob"):
                node.add_user(user)
            node.start()
            ids = [node.send(sender, "alice", subject, body) for sender, subject, body in INBOX]
            for message_id in ids:
                wait_for("mail for alice", lambda m=message_id: node.uids("alice", "INBOX", m),
                         timeout=60, explain=node.log)  # fmt: skip
            user_js = node.write_thunderbird_files("alice") + EXTRA_PREFS
            ca_pem = (node.thunderbird_dir / "onionpost-ca.pem").read_text()

            tb = Thunderbird(root / "thunderbird", headless=False, env={"DISPLAY": display})
            tb.context = node.log
            tb.start()
            tb.trust_ca_and_save_logins(ca_pem, "alice", node.passwords["alice"])
            tb.quit()
            tb.start(user_js)
            tb.js(f"window.moveTo(0, 0); window.resizeTo({WIDTH}, {HEIGHT});")
            wait_for("the 3-pane window", lambda: tb.js(WINDOW, "mail:3pane"), timeout=60)
            wait_for(
                "alice's folders and mail in Thunderbird",
                lambda: tb.js(
                    "const r = MailServices.accounts.defaultAccount.incomingServer.rootFolder;"
                    "return r.subFolders.length >= 6 && "
                    f"r.getChildNamed('INBOX').getTotalMessages(false) >= {len(INBOX)};"
                ),
                timeout=60,
                explain=tb.evidence,
            )
            # One message in Sent, written in Thunderbird itself.
            carol = node.addresses["carol"]
            tb.js_async(SEND, carol, "Re: Lunch on Saturday?", "Yes, noon is fine.\n\nAlice\n")

            tb.js(SHOW_MESSAGE, "INBOX", None)
            tb.js(LAYOUT)
            # Let the status bar's "Connecting to 127.0.0.1..." from the send go away.
            wait_for("a quiet status bar", lambda: not tb.js(LAYOUT)["status"], timeout=30)
            time.sleep(1)
            x, _, w, _ = tb.js(LAYOUT)["threadPane"]
            shoot(display, "folders", (0, 0, x + w + 1, 340), 1000)

            tb.js(SHOW_MESSAGE, "INBOX", ids[0].strip("<>"))
            time.sleep(2)
            layout = tb.js(LAYOUT)
            left = layout["threadPane"][0]
            shoot(display, "verified", (left, 0, WIDTH - left, 430), 950)

            tb.js(COMPOSE, carol, "Photos for Saturday", "Hi Carol,\n\nhere they are.\n\nAlice\n")
            wait_for("the compose window", lambda: tb.js(COMPOSE_READY), timeout=60)
            time.sleep(2)
            shoot(display, "compose", (40, 30, 1000, 420), 900)
            tb.remove()
            tb = None

            untrusted_ca_warning(root, display, user_js)
        finally:
            if tb is not None:
                tb.remove()
            node.stop()


if __name__ == "__main__":
    main()
