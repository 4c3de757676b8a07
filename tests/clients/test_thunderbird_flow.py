"""Thunderbird itself, as alice, against a real ``onionpost run`` node: the acceptance test.

One node hosts alice and carol (``[tor] mode = "off"``: mail between two users of one node is
still sealed, delivered through the node's own inbox and verified).  Thunderbird 153 ESR runs
headless under Marionette with a throw-away profile that holds exactly what a person's would:

* the gateway's local CA, imported into the profile's NSS certificate database with the trust
  flags "C,," -- what Settings > Privacy & Security > Manage Certificates > Authorities >
  Import with "Trust this CA to identify websites" does.  That route, not a per-port
  certificate override ("Confirm Security Exception"), because an override accepts one
  certificate whatever is wrong with its chain: with the CA trusted, NSS has to validate the
  gateway's real chain (CA:FALSE leaf, name-constrained CA) exactly as it will for a person
  who imports the CA or installs the policies.json, so a broken certificate fails this test;
* alice's gateway password in the profile's password manager (what ticking "Use Password
  Manager to remember this password" at the first prompt does);
* and then, for the second start, the ``user.js`` that ``onionpost thunderbird --write``
  generated, copied in unchanged.

The first two need a running Thunderbird (there is no ``certutil`` in the packages that
``make test`` installs, and the password store is encrypted), so the profile is prepared in a
short first run *without* user.js: with the account in place, Thunderbird would log in at
start-up, before Marionette could add anything.  Each start takes 2-10 s.

The test then proves, in order: (a) the account exists without the account wizard/hub having
run, and its login over STARTTLS found the six SPECIAL-USE folders; (b) alice sends to carol
with Thunderbird's compose API (SMTP submission, then Fcc APPEND to Sent); (e) Sent holds that
mail exactly once although both Thunderbird's Fcc and onionpost's own filing put it there;
(c) mail from carol (smtplib) reaches Thunderbird by IMAP IDLE, with no refresh asked for,
within seconds; (d) Thunderbird moves it to Archive with UID MOVE and the server shows it;
(f) Thunderbird shows carol's verified profile name in From (her ``profile set`` name), with
the different name her message claims marked "(unverified: ...)" after it.

Thunderbird missing is a failure, not a skip: ``make test`` installs it (scripts/system-deps.sh).
Headless mode needs no X server; Xvfb is needed only by docs/images/make-thunderbird-screenshots.py.
The helpers here are reused by that script.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any, TypeVar

import pytest

from onionpost.testing.ports import free_port
from tests.clients.conftest import require

pytestmark = pytest.mark.clients

T = TypeVar("T")

#: How long Thunderbird may take to answer one Marionette command (a script gets 15 s less).
ANSWER_TIMEOUT = 75
#: How long the node's Sent copy waits for Thunderbird's own (Fcc) before it is filed.
SENT_COPY_WAIT = 3
#: What the node logs when it finds the client's own copy in Sent and files none.
CLIENT_COPY_FOUND = "the client saved its own copy in Sent; none filed"
#: What Thunderbird's IMAP log says when the server tells it something while it IDLEs.
IDLE_RESPONSE = "S-INBOX:HandleIdleResponses: idle response"
#: carol's verified profile name (`onionpost profile set`); her mail claims "Carol".
CAROL_NAME = "Carol Liddell"
ONION = re.compile(r"\b([a-z0-9._-]+@[a-z2-7]{56}\.onion)\b")

# Only for the test profile, never for the user.js people get: no first-run dialogs, nothing
# that phones home (every proxied connection goes to a closed port on loopback; connections to
# 127.0.0.1 itself are never proxied), and Thunderbird's console copied to its stdout.
TEST_PREFS: dict[str, str | int | bool] = {
    "marionette.port": 0,  # a free port, written to <profile>/MarionetteActivePort
    "mail.provider.suppress_dialog_on_startup": True,  # the first run has no account yet
    "mail.shell.checkDefaultClient": False,
    "mail.biff.show_alert": False,
    "mail.biff.play_sound": False,
    "app.update.disabledForTesting": True,
    "app.update.auto": False,
    "extensions.update.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1",
    "network.proxy.http_port": 9,
    "network.proxy.ssl": "127.0.0.1",
    "network.proxy.ssl_port": 9,
    "network.proxy.socks": "127.0.0.1",
    "network.proxy.socks_port": 9,
    "network.proxy.socks_remote_dns": True,
    "services.settings.server": "http://127.0.0.1:9/v1",
    "devtools.console.stdout.chrome": True,
    "browser.dom.window.dump.enabled": True,
}


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    explain: Callable[[], str] = lambda: "",
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout:.0f} s waiting for {what}.\n{explain()}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40, *, skip: tuple[str, ...] = ()) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} is missing)"
    kept = [line for line in text if line.strip() and not any(s in line for s in skip)]
    return "\n".join(kept[-lines:])


# --- the node --------------------------------------------------------------------------------


class Node:
    """A data directory with users and a real ``onionpost run`` process on loopback ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "node"
        self.log_path = root / "node.log"
        self.thunderbird_dir = root / "thunderbird-files"
        self.imap_port, self.smtp_port = free_port(), free_port()
        self.autoconfig_port, self.inbox_port = free_port(), free_port()
        self.addresses: dict[str, str] = {}
        self.passwords: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir.mkdir(parents=True, mode=0o700)
        (self.data_dir / "onionpost.toml").write_text(
            '[tor]\nmode = "off"\n\n'
            f"[gateway]\nsmtp_port = {self.smtp_port}\nimap_port = {self.imap_port}\n"
            f"autoconfig_port = {self.autoconfig_port}\n"
            f"sent_copy_wait_seconds = {SENT_COPY_WAIT}\n\n"
            f"[inbox]\nlisten_port = {self.inbox_port}\npow_bits = 4\n"
        )

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def cli(self, *args: str) -> str:
        """Run ``onionpost --data-dir D ARGS`` as a person would; fail on a non-zero exit."""
        argv = [sys.executable, "-m", "onionpost", "--data-dir", str(self.data_dir), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            pytest.fail(f"`onionpost {' '.join(args)}` exited with {done.returncode}:\n{output}")
        return output

    def add_user(self, name: str) -> None:
        """``init --user`` for the first user, ``users add`` for the others."""
        first = not self.addresses
        out = self.cli("init", "--user", name) if first else self.cli("users", "add", name)
        address, password = ONION.search(out), re.search(r"password:\s+(\S+)", out)
        assert address and password, f"no address or password for {name} in:\n{out}"
        self.addresses[name], self.passwords[name] = address.group(1), password.group(1)

    def write_thunderbird_files(self, user: str) -> str:
        """``onionpost thunderbird --user USER --write DIR``; return the generated user.js."""
        self.cli("thunderbird", "--user", user, "--write", str(self.thunderbird_dir))
        for name in ("user.js", "policies.json", "onionpost-ca.pem"):
            assert (self.thunderbird_dir / name).is_file(), f"`thunderbird --write` made no {name}"
        return (self.thunderbird_dir / "user.js").read_text()

    def start(self) -> None:
        argv = [sys.executable, "-m", "onionpost", "--data-dir", str(self.data_dir), "run"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"`onionpost run` exited with {self.proc.returncode}:\n{self.log()}")
            if "onionpost node ready" not in self.log_path.read_text(errors="replace"):
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.imap_port), timeout=1),
            ):
                return True
            return False

        wait_for("`onionpost run` to be ready", ready, timeout=60, explain=self.log)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the node's clean shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self, lines: int = 60) -> str:
        return f"--- node log ({self.log_path}) ---\n{tail(self.log_path, lines)}"

    def imap(self, user: str) -> imaplib.IMAP4:
        """A second, independent IMAP client (Python's imaplib) for checking the server side."""
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        client.starttls(ssl_context=ssl.create_default_context(cafile=self.ca_file))
        client.login(user, self.passwords[user])
        return client

    def uids(self, user: str, folder: str, message_id: str) -> list[int]:
        """The UIDs in ``folder`` of messages whose Message-ID is ``message_id``."""
        client = self.imap(user)
        try:
            typ, _ = client.select(folder, readonly=True)
            assert typ == "OK", f"cannot select {folder} as {user}"
            typ, data = client.uid("SEARCH", "HEADER", "Message-ID", message_id)
            assert typ == "OK", data
            return [int(u) for u in (data[0] or b"").split()]
        finally:
            client.logout()

    def header(self, user: str, folder: str, uid: int) -> bytes:
        client = self.imap(user)
        try:
            client.select(folder, readonly=True)
            typ, data = client.uid("FETCH", str(uid), "(BODY.PEEK[HEADER])")
            assert typ == "OK" and data and isinstance(data[0], tuple), data
            return data[0][1]
        finally:
            client.logout()

    def count(self, user: str, folder: str) -> int:
        client = self.imap(user)
        try:
            typ, data = client.select(folder, readonly=True)
            assert typ == "OK", data
            return int(data[0] or 0)
        finally:
            client.logout()

    def send(
        self, sender: str, to: str, subject: str, body: str, *, name: str | None = None
    ) -> str:
        """Submit a message as ``sender`` (From display name ``name``, by default the user
        name capitalized) with smtplib over STARTTLS; return its Message-ID."""
        msg = EmailMessage()
        msg["From"] = f"{name or sender.capitalize()} <{self.addresses[sender]}>"
        msg["To"] = self.addresses[to]
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain=self.addresses[sender].split("@")[1])
        msg.set_content(body)
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=self.ca_file))
            smtp.login(sender, self.passwords[sender])
            smtp.send_message(msg)
        return str(msg["Message-ID"])


# --- Thunderbird -----------------------------------------------------------------------------


class Thunderbird:
    """Thunderbird with a throw-away profile, driven through Marionette's chrome context.

    ``headless=False`` shows a real window on ``$DISPLAY`` (for screenshots under Xvfb).
    """

    def __init__(self, root: Path, *, headless: bool = True, env: dict[str, str] | None = None):
        self.binary = require("thunderbird", "thunderbird")
        self.root = root
        self.profile = root / "profile"
        self.home = root / "home"
        self.headless = headless
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.marionette: Any = None
        self.runs = 0
        #: More evidence for failure messages (the test sets it to the node's log).
        self.context: Callable[[], str] = lambda: ""
        self.profile.mkdir(parents=True)
        self.home.mkdir()
        (self.profile / "prefs.js").write_text(
            "".join(
                f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in TEST_PREFS.items()
            )
        )

    # -- paths of the evidence

    @property
    def log_path(self) -> Path:
        return self.root / f"thunderbird-{self.runs}.log"

    @property
    def imap_log_path(self) -> Path:
        # MOZ_LOG_FILE gets ".moz_log" appended (and per-process suffixes for child processes).
        return self.root / f"imap-{self.runs}.log.moz_log"

    def imap_log(self) -> str:
        """Thunderbird's own record of the IMAP commands it sent (MOZ_LOG=IMAP:5)."""
        try:
            return self.imap_log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- start and stop

    def start(self, user_js: str | None = None, *, connect: bool = True) -> None:
        """Start Thunderbird (with ``user_js`` as the profile's user.js) and connect Marionette.

        ``connect=False`` only waits until Marionette listens (for a Thunderbird that is
        expected to sit behind a modal dialog); :meth:`quit` then kills it.
        """
        with warnings.catch_warnings():  # mozinfo calls a deprecated distro function
            warnings.simplefilter("ignore", DeprecationWarning)
            from marionette_driver.marionette import Marionette

        if user_js is not None:
            (self.profile / "user.js").write_text(user_js)
        (self.profile / "MarionetteActivePort").unlink(missing_ok=True)
        self.runs += 1
        env = {
            **os.environ,
            **self.extra_env,
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "MOZ_CRASHREPORTER_DISABLE": "1",
            "MOZ_LOG": "IMAP:5,timestamp,sync",
            "MOZ_LOG_FILE": str(self.root / f"imap-{self.runs}.log"),
        }
        argv = [self.binary, "--marionette", "--remote-allow-system-access", "--no-remote"]
        argv += ["--headless"] if self.headless else []
        argv += ["--profile", str(self.profile)]
        with self.log_path.open("wb") as log:
            # Its own process group, so that stopping it also stops its content processes.
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        port_file = self.profile / "MarionetteActivePort"

        def port() -> int | None:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"Thunderbird exited with {self.proc.returncode}.\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                return int(port_file.read_text())
            return None

        marionette_port = wait_for(
            "Thunderbird's Marionette port", port, timeout=90, explain=self.output
        )
        if not connect:
            return
        self.marionette = Marionette(host="127.0.0.1", port=marionette_port, socket_timeout=30)
        try:
            self.marionette.start_session(timeout=60)
            error = None
        except OSError as exc:  # socket.timeout included
            error = exc
        if error is not None:
            self._forget_session()
            pytest.fail(
                f"Thunderbird did not answer Marionette ({error}). It is probably showing a "
                "modal dialog: an untrusted certificate or a password prompt.\n" + self.evidence(),
                pytrace=False,
            )
        self.marionette.client.socket_timeout = ANSWER_TIMEOUT
        self.marionette.set_context("chrome")
        self.marionette.timeout.script = ANSWER_TIMEOUT - 15

    def _forget_session(self) -> None:
        if self.marionette is None:
            return
        with contextlib.suppress(Exception):
            self.marionette.client.close()
        # Otherwise the driver's __del__ reconnects to delete the session it thinks it has.
        self.marionette.session = None
        self.marionette.cleanup_ran = True
        self.marionette = None

    def quit(self) -> None:
        """Quit cleanly (so that the profile is saved), else kill; always reap the process."""
        clean = False
        if self.marionette is not None:
            self.marionette.client.socket_timeout = 10
            # Quitting ends the Marionette connection under us: whatever it raises is expected.
            with contextlib.suppress(Exception):
                self.js("Services.startup.quit(Ci.nsIAppStartup.eForceQuit);")
                clean = True
            self._forget_session()
        if self.proc is None:
            return
        try:
            self.proc.wait(30 if clean else 0.1)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # leftover content processes
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def remove(self) -> None:
        self.quit()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- scripting

    def js(self, script: str, *args: object) -> Any:
        return self.marionette.execute_script(script, script_args=list(args))

    def js_async(self, script: str, *args: object) -> Any:
        """``script`` ends by calling ``resolve(value)`` (the last argument)."""
        body = "const resolve = arguments[arguments.length - 1];\n" + script
        return self.marionette.execute_async_script(body, script_args=list(args))

    def trust_ca_and_save_logins(self, ca_pem: str, user: str, password: str) -> None:
        """Import the CA ("C,,": trusted to identify servers) and save the gateway password."""
        self.js_async(
            """
            const [pem, user, password] = arguments;
            const certdb = Cc["@mozilla.org/security/x509certdb;1"]
              .getService(Ci.nsIX509CertDB);
            const base64 = pem.replace(/-----[A-Z ]+-----/g, "").replace(/\\s+/g, "");
            certdb.addCertFromBase64(base64, "C,,");
            const logins = ["imap", "smtp"].map(scheme => {
              // The origin and realm Thunderbird looks its server passwords up by.
              const origin = `${scheme}://127.0.0.1`;
              const login = Cc["@mozilla.org/login-manager/loginInfo;1"]
                .createInstance(Ci.nsILoginInfo);
              login.init(origin, null, origin, user, password, "", "");
              return login;
            });
            Services.logins.addLogins(logins).then(() => resolve(true));
            """,
            ca_pem,
            user,
            password,
        )

    def console(self, lines: int = 40) -> str:
        """Thunderbird's error console (what Tools > Developer Tools > Error Console shows)."""
        if self.marionette is None:
            return "(no Marionette session)"
        self.marionette.client.socket_timeout = 10  # it may be stuck behind a modal dialog
        try:
            messages = self.js(
                "return Services.console.getMessageArray().map(m => m.message || String(m));"
            )
            return "\n".join(messages[-lines:])
        except Exception as exc:
            return f"(Thunderbird's console is not reachable: {exc})"
        finally:
            if self.marionette is not None:
                self.marionette.client.socket_timeout = ANSWER_TIMEOUT

    def output(self) -> str:
        noise = ("Gtk-CRITICAL", "glib warning", "Gtk-WARNING", "GLib-GObject")
        return f"--- Thunderbird output ({self.log_path}) ---\n" + tail(
            self.log_path, 30, skip=noise
        )

    def idling_on_inbox(self) -> bool:
        """Whether the last command Thunderbird sent on INBOX was IDLE (and not yet DONE)."""
        commands = re.findall(r"S-INBOX:SendData: (.*)", self.imap_log())
        return bool(commands) and re.fullmatch(r"\d+ IDLE", commands[-1].strip()) is not None

    def imap_problems(self) -> list[str]:
        """TLS errors and refusals in Thunderbird's IMAP log (an untrusted CA, a bad password)."""
        pattern = re.compile(r"Security error|error code=|CreateNewLineFromSocket: \S+ (NO|BAD) ")
        return [line for line in self.imap_log().splitlines() if pattern.search(line)]

    def evidence(self) -> str:
        imap = [line for line in self.imap_log().splitlines() if "SendData" in line]
        problems = self.imap_problems()
        return (
            f"--- Thunderbird console ---\n{self.console()}\n{self.output()}\n{self.context()}\n"
            f"--- Thunderbird's IMAP commands ({self.imap_log_path}) ---\n"
            + "\n".join(imap[-25:])
            + ("\n--- IMAP problems ---\n" + "\n".join(problems[-10:]) if problems else "")
        )


# --- what the test asks Thunderbird, in its own chrome JavaScript ----------------------------

ACCOUNT = """
const account = MailServices.accounts.defaultAccount;
if (!account) return null;
const server = account.incomingServer;
const identity = account.defaultIdentity;
const smtp = MailServices.outgoingServer.getServerByKey(identity.smtpServerKey)
  .QueryInterface(Ci.nsISmtpServer);
const win = Services.wm.getMostRecentWindow("mail:3pane");
return {
  key: account.key,
  accounts: MailServices.accounts.accounts.map(a => a.incomingServer.type),
  type: server.type, host: server.hostname, port: server.port, user: server.username,
  socketType: server.socketType,
  email: identity.email,
  smtp: {host: smtp.hostname, port: smtp.port, user: smtp.username, socketType: smtp.socketType},
  folders: Object.fromEntries(server.rootFolder.subFolders.map(f => [f.name, f.flags])),
  windows: Array.from(Services.wm.getEnumerator(null), w => w.document.documentURI),
  hub: !!win.document.querySelector("account-hub-container"),
  tabs: win.document.getElementById("tabmail").tabInfo.map(t => t.mode.name),
  autoconfig: Services.prefs.getStringPref("mailnews.auto_config_url"),
};
"""

LISTEN = """
// Records every message header Thunderbird adds to any folder's database, with the time.
if (!window.onionpostSeen) {
  window.onionpostSeen = [];
  window.onionpostListener = {
    msgAdded(hdr) {
      // The From name the message list shows: Thunderbird's own parse of its decoded From.
      const [from] = MailServices.headerParser.parseDecodedHeader(hdr.mime2DecodedAuthor);
      window.onionpostSeen.push({at: Date.now() / 1000, folder: hdr.folder.name,
                                 messageId: hdr.messageId, subject: hdr.subject,
                                 fromName: from ? from.name : "",
                                 fromEmail: from ? from.email : ""});
    },
  };
  MailServices.mfn.addListener(window.onionpostListener,
                               Ci.nsIMsgFolderNotificationService.msgAdded);
}
return window.onionpostSeen.length;
"""

SEND = """
// What the compose window's Send button does, without the window.
const [to, subject, body] = arguments;
const account = MailServices.accounts.defaultAccount;
const identity = account.defaultIdentity;
const fields = Cc["@mozilla.org/messengercompose/composefields;1"]
  .createInstance(Ci.nsIMsgCompFields);
fields.from = identity.email;
fields.to = to;
fields.subject = subject;
fields.body = body;
const params = Cc["@mozilla.org/messengercompose/composeparams;1"]
  .createInstance(Ci.nsIMsgComposeParams);
params.composeFields = fields;
params.identity = identity;
params.type = Ci.nsIMsgCompType.New;
params.format = Ci.nsIMsgCompFormat.PlainText;
const compose = MailServices.compose.initCompose(params, null, null);
const events = [];
compose.addMsgSendListener({
  onStartSending() { events.push("start sending"); },
  onProgress() {},
  onStatus(message) { events.push(`status: ${message}`); },
  onStopSending(messageId, status, message) {
    events.push(`stop sending: ${messageId} status ${status} ${message || ""}`);
  },
  onGetDraftFolderURI() {},
  onSendNotPerformed(messageId, status) { events.push(`not sent: status ${status}`); },
  onTransportSecurityError(messageId, status, secInfo, location) {
    events.push(`TLS error ${status} at ${location}`);
  },
});
compose.RegisterStateListener({
  NotifyComposeFieldsReady() {},
  NotifyComposeBodyReady() {},
  SaveInFolderDone() {},
  // Called once the SMTP submission and the Fcc copy to Sent have both finished.
  ComposeProcessDone(result) {
    resolve({result, events, messageId: fields.messageId, fcc: identity.doFcc,
             fccFolder: identity.fccFolderURI});
  },
});
const progress = Cc["@mozilla.org/messenger/progress;1"].createInstance(Ci.nsIMsgProgress);
compose.sendMsg(Ci.nsIMsgCompDeliverMode.Now, identity, account.key, null, progress)
  .catch(e => resolve({result: String(e), events}));
"""

SYNC_FOLDER = """
// Brings one folder's message list up to date, as selecting it in the folder pane does.
const [name] = arguments;
const root = MailServices.accounts.defaultAccount.incomingServer.rootFolder;
const folder = root.getChildNamed(name).QueryInterface(Ci.nsIMsgImapMailFolder);
const win = Services.wm.getMostRecentWindow("mail:3pane");
folder.updateFolderWithListener(win.msgWindow, {
  OnStartRunningUrl() {},
  OnStopRunningUrl(url, status) {
    const ids = [...folder.messages].map(h => h.messageId);
    resolve({status, ids});
  },
});
"""

MOVE = """
// What dragging a message onto a folder (or Move To) does.
const [messageId, from, to] = arguments;
const root = MailServices.accounts.defaultAccount.incomingServer.rootFolder;
const source = root.getChildNamed(from);
const target = root.getChildNamed(to);
const hdr = source.msgDatabase.getMsgHdrForMessageID(messageId);
if (!hdr) { resolve({status: `no message ${messageId} in ${from}`}); return; }
const win = Services.wm.getMostRecentWindow("mail:3pane");
MailServices.copy.copyMessages(source, [hdr], target, true, {
  onStartCopy() {}, onProgress() {}, setMessageKey() {}, getMessageId() { return null; },
  onStopCopy(status) { resolve({status}); },
}, win.msgWindow, true);
"""

# nsMsgFolderFlags of the folders the gateway marks with SPECIAL-USE (and INBOX).
FOLDER_FLAGS = {
    "INBOX": 0x1000,
    "Sent": 0x200,
    "Drafts": 0x400,
    "Archive": 0x4000,
    "Junk": 0x40000000,
    "Trash": 0x100,
}


def bare(message_id: str) -> str:
    """Thunderbird keeps Message-IDs without the angle brackets."""
    return message_id.strip().strip("<>")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def node() -> Iterator[Node]:
    # Under a 0755 folder in /tmp, not pytest's 0700 tmp_path: as root, the node's Dovecot
    # reaches the Maildirs as another account, which must pass through every folder above.
    base = Path(tempfile.mkdtemp(prefix="optb-", dir="/tmp"))
    base.chmod(0o755)
    try:
        n = Node(base)
        n.add_user("alice")
        n.add_user("carol")
        # carol's signed profile: her mail carries it, and alice's node shows its name in From
        n.cli("profile", "set", "--user", "carol", "--name", CAROL_NAME)
        n.start()
        yield n
        n.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def thunderbird(tmp_path: Path) -> Iterator[Thunderbird]:
    tb = Thunderbird(tmp_path / "thunderbird")
    yield tb
    tb.remove()


# --- the test --------------------------------------------------------------------------------


def test_thunderbird_as_alice(node: Node, thunderbird: Thunderbird) -> None:
    tb = thunderbird
    alice, carol = node.addresses["alice"], node.addresses["carol"]

    tb.context = node.log
    explain = tb.evidence

    def check(condition: object, message: str) -> None:
        if not condition:
            pytest.fail(f"{message}\n{explain()}", pytrace=False)

    started = time.monotonic()
    user_js = node.write_thunderbird_files("alice")
    ca_pem = (node.thunderbird_dir / "onionpost-ca.pem").read_text()

    # The profile as a person leaves it after importing the CA and saving the password.
    tb.start()
    tb.trust_ca_and_save_logins(ca_pem, "alice", node.passwords["alice"])
    tb.quit()
    tb.start(user_js)
    startup = time.monotonic() - started

    try:
        # (a) The account comes from user.js alone, and its first login (STARTTLS, the CA from
        # the profile, the saved password) listed the six folders with their roles.
        def logged_in() -> dict[str, Any] | None:
            if problems := tb.imap_problems():
                pytest.fail(
                    "Thunderbird's IMAP login failed (SEC_ERROR_UNKNOWN_ISSUER: the local CA is "
                    "not trusted in the profile; NO: a wrong password):\n"
                    + "\n".join(problems)
                    + f"\n{explain()}",
                    pytrace=False,
                )
            account = tb.js(ACCOUNT)
            return account if account and len(account["folders"]) >= len(FOLDER_FLAGS) else None

        account = wait_for(
            "Thunderbird to log in and list alice's folders", logged_in, timeout=60, explain=explain
        )
        check(account["key"].startswith("onionpost_alice_"), f"unexpected account {account}")
        check(account["accounts"] == ["imap", "none"], f"accounts: {account['accounts']}")
        check(
            (account["type"], account["host"], account["port"], account["user"])
            == ("imap", "127.0.0.1", node.imap_port, "alice"),
            f"the IMAP server is not the gateway: {account}",
        )
        check(account["socketType"] == 2, f"IMAP is not STARTTLS: {account}")
        check(account["email"] == alice, f"identity {account['email']} is not {alice}")
        check(
            account["smtp"] == {"host": "127.0.0.1", "port": node.smtp_port, "user": "alice",
                                "socketType": 2},
            f"the SMTP server is not the gateway: {account['smtp']}",
        )  # fmt: skip
        for name, flag in FOLDER_FLAGS.items():
            flags = account["folders"].get(name)
            check(flags is not None and flags & flag, f"{name} missing or unmarked: {account}")
        check(
            account["windows"] == ["chrome://messenger/content/messenger.xhtml"]
            and not account["hub"]
            and account["tabs"] == ["mail3PaneTab"],
            f"an account wizard, hub or other window opened: {account}",
        )
        check(
            account["autoconfig"].startswith(f"http://127.0.0.1:{node.autoconfig_port}/"),
            f"autoconfig would leave this computer: {account['autoconfig']}",
        )
        starttls = re.search(r"SendData: \d+ STARTTLS", tb.imap_log())
        login = re.search(r"SendData: \d+ (authenticate|login)\b", tb.imap_log(), re.IGNORECASE)
        check(
            starttls and login and starttls.start() < login.start(),
            "Thunderbird did not start TLS before it logged in",
        )

        tb.js(LISTEN)

        # (b) alice writes to carol: SMTP submission, then the Fcc copy to Sent, as Send does.
        subject_out = "Hello carol, from Thunderbird"
        sent = tb.js_async(SEND, carol, subject_out, "Written in Thunderbird as alice.\n")
        check(sent["result"] == 0, f"sending failed: {sent}")
        check(
            sent["fcc"] and sent["fccFolder"] == "imap://alice@127.0.0.1/Sent",
            f"the identity does not file a copy in Sent: {sent}",
        )
        out_id = sent["messageId"]
        check(out_id.endswith(alice.split("@")[1] + ">"), f"odd Message-ID {out_id}")
        delivered = wait_for(
            "carol to receive alice's message",
            lambda: node.uids("carol", "INBOX", out_id),
            timeout=60,
            explain=explain,
            interval=0.3,
        )
        received = node.header("carol", "INBOX", delivered[0]).decode()
        check(
            f"X-Onionpost-Verified: {alice}" in received and f"Subject: {subject_out}" in received,
            f"carol's copy is not verified as alice's:\n{received}",
        )
        appended = re.search(r'SendData: (\d+) append "Sent"', tb.imap_log(), re.IGNORECASE)
        check(appended, "Thunderbird never appended its Fcc copy to Sent")
        assert appended
        check(
            re.search(rf"CreateNewLineFromSocket: {appended[1]} OK \[APPENDUID", tb.imap_log()),
            "the gateway did not accept Thunderbird's Fcc APPEND",
        )

        # (e) ... and yet alice's Sent holds it exactly once: the node's own Sent copy waited
        # SENT_COPY_WAIT seconds, found Thunderbird's (same Message-ID) and was not filed.
        wait_for(
            "the node to find Thunderbird's copy in Sent",
            lambda: CLIENT_COPY_FOUND in node.log_path.read_text(errors="replace"),
            timeout=120,
            explain=node.log,
        )
        in_sent = node.uids("alice", "Sent", out_id)
        check(len(in_sent) == 1, f"Sent holds {out_id} {len(in_sent)} times (UIDs {in_sent})")
        check(node.count("alice", "Sent") == 1, "Sent holds more than alice's one message")
        sent_view = tb.js_async(SYNC_FOLDER, "Sent")
        check(
            sent_view["status"] == 0 and sent_view["ids"].count(bare(out_id)) == 1,
            f"Thunderbird's Sent does not show the message exactly once: {sent_view}",
        )

        # (c) carol writes to alice; Thunderbird must learn of it by IDLE on INBOX, not because
        # anybody asked it to look (nothing below touches INBOX until it has arrived).
        wait_for("Thunderbird to IDLE on INBOX", tb.idling_on_inbox, timeout=30, explain=explain)
        subject_in = "Hello alice, from carol"
        seen_before = tb.js(LISTEN)
        idle_responses = tb.imap_log().count(IDLE_RESPONSE)
        submitted_at = time.time()
        in_id = node.send("carol", "alice", subject_in, "Sent with smtplib as carol.\n")

        def arrived() -> dict[str, Any] | None:
            seen = tb.js("return window.onionpostSeen;")[seen_before:]
            return next((s for s in seen if s["messageId"] == bare(in_id)), None)

        # IDLE does it in about a second; without IDLE Thunderbird would look again only after
        # its 10-minute biff interval, far past this timeout (and the IDLE log is checked below).
        news = wait_for(
            "Thunderbird to notice carol's message by IDLE",
            arrived,
            timeout=60,
            explain=explain,
            interval=0.05,
        )
        latency = news["at"] - submitted_at  # reported below; how long depends on the machine
        check(news["folder"] == "INBOX", f"carol's message appeared in {news['folder']}")
        check(news["subject"] == subject_in, f"unexpected subject {news['subject']!r}")
        # (f) From as Thunderbird shows it: carol's verified profile name first, the different
        # name her message claims ("Carol") kept after it, marked (docs/contacts.md, Profiles).
        check(
            (news["fromName"], news["fromEmail"]) == (f"{CAROL_NAME} (unverified: Carol)", carol),
            f"Thunderbird shows carol's message from {news['fromName']!r} <{news['fromEmail']}>",
        )
        check(
            tb.imap_log().count(IDLE_RESPONSE) > idle_responses,
            "Thunderbird found the message, but not through an untagged response during IDLE",
        )
        check(len(node.uids("alice", "INBOX", in_id)) == 1, "the message is not in INBOX")

        # (d) Thunderbird moves it to Archive with UID MOVE; the server shows the result.
        moved = tb.js_async(MOVE, bare(in_id), "INBOX", "Archive")
        check(moved["status"] == 0, f"Thunderbird could not move the message: {moved}")

        def filed() -> bool:
            return bool(node.uids("alice", "Archive", in_id)) and not node.uids(
                "alice", "INBOX", in_id
            )

        wait_for("the server to show the message in Archive, not INBOX", filed, timeout=30,
                 explain=explain, interval=0.3)  # fmt: skip
        check(
            re.search(r"SendData: \d+ uid move \d+ \"?Archive\"?", tb.imap_log(), re.IGNORECASE),
            "Thunderbird did not use UID MOVE",
        )
        check(len(node.uids("alice", "Archive", in_id)) == 1, "Archive holds it more than once")
        archived = node.header("alice", "Archive", node.uids("alice", "Archive", in_id)[0])
        check(
            f"X-Onionpost-Verified: {carol}".encode() in archived,
            f"the archived message lost its verification header:\n{archived.decode()}",
        )

        # (f) ... and when she writes under her own name, just that name.
        seen_before = tb.js("return window.onionpostSeen.length;")
        named_id = node.send("carol", "alice", "Under my own name", "Hello.\n", name=CAROL_NAME)
        named = wait_for(
            "Thunderbird to show carol's second message",
            lambda: next(
                (
                    s
                    for s in tb.js("return window.onionpostSeen;")[seen_before:]
                    if s["messageId"] == bare(named_id)
                ),
                None,
            ),
            timeout=60,
            explain=explain,
            interval=0.1,
        )
        check(
            (named["fromName"], named["fromEmail"]) == (CAROL_NAME, carol),
            f"Thunderbird shows carol's message from {named['fromName']!r} <{named['fromEmail']}>",
        )
    except Exception as exc:
        if isinstance(exc, pytest.fail.Exception):
            raise
        pytest.fail(f"{type(exc).__name__}: {exc}\n{explain()}")

    total = time.monotonic() - started
    print(
        f"Thunderbird: profile and start {startup:.1f} s; new mail by IDLE in {latency:.2f} s; "
        f"whole flow {total:.1f} s"
    )
