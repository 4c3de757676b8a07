"""Thunderbird set up with onionpost's user.js contacts nobody but the gateway: the leak test.

For people who chose onion mail, every connection Thunderbird makes on its own (telemetry,
update and add-on checks, remote settings, Safe Browsing, the region lookup, connectivity
checks, ...) tells Mozilla, Google, the DNS resolver and the network that this computer runs
Thunderbird, and when.  ``render_user_js`` switches them off; this test holds it to that by
watching the system calls, which no pref can hide:

* a node (alice, carol) runs on loopback, and ``onionpost thunderbird --write`` makes the files;
* a fresh profile gets exactly what a person's gets: the generated user.js, unchanged, the
  gateway's CA trusted and alice's password saved.  Those two come from a short preparation run
  in a *separate* profile (they need a running Thunderbird, see test_thunderbird_flow.py), whose
  ``cert9.db``, ``key4.db`` and ``logins.json`` are copied over: the watched profile never ran
  before, so first-run behaviour is included, and it has none of the test prefs (Marionette, a
  proxy) that would hide a leak;
* Thunderbird runs without Marionette under ``strace -f`` (connect, sendto, sendmsg, sendmmsg:
  every way a socket can be given an address) until it has logged in over IMAP, started IDLE,
  received a message from carol by IDLE, and passed the first round of its update timers
  (30 s after start: add-on, blocklist, remote settings, media plugin checks);
* the trace must show no connect() or send to anything but 127.0.0.0/8, ::1, unix sockets and
  netlink, and no DNS query: nothing to port 53 (on any address, 127.0.0.53 included) and no
  host lookup through systemd-resolved's or nscd's sockets.

Thunderbird's connections that user.js could not switch off end at the dead-end proxy it names
(``DEAD_END_PROXY_PORT`` on 127.0.0.1); Thunderbird's HTTP log tells which URL each was for, and
only the ones in ``NO_SWITCH`` may be there, so a service that a new Thunderbird adds (or a
pref it renames) fails here even though the proxy stops it.

The policies.json is for every profile on the computer and is read only from /etc or the
program's directory, so it is not installed here; the preparation run instead checks each of
its policies against Thunderbird's own policy schema and implementation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.thunderbird import DEAD_END_PROXY_PORT
from tests.clients.conftest import require
from tests.clients.test_thunderbird_flow import Node, Thunderbird, tail, wait_for

pytestmark = pytest.mark.clients

#: How long after its start Thunderbird is watched at least: its update timer manager first
#: fires 30 s after start-up (app.update.timerFirstInterval) and then runs every timer that is
#: due, which on a new profile is all of them; the late idle tasks (security remote settings)
#: start after 20 s of user idleness.  A slow machine makes them later, never the test fail.
WATCH_AT_LEAST = 45.0
#: Connections that no pref in Thunderbird 153 switches off, which the dead-end proxy stops.
#: The remote settings poll runs once a day from the update timer; release builds ignore a
#: changed services.settings.server and no Thunderbird policy disables remote settings.
NO_SWITCH = {"thunderbird-settings.thunderbird.net"}
#: nscd request types that look a host up (nscd/nscd-client.h: GETHOSTBYNAME, GETHOSTBYNAMEv6,
#: GETHOSTBYADDR, GETHOSTBYADDRv6, GETAI); a request starts with version 2 and its type.
NSCD_HOST_REQUESTS = {4, 5, 6, 7, 14}
#: systemd-resolved's socket for name lookups (nss-resolve).
RESOLVED_SOCKETS = ("/run/systemd/resolve/io.systemd.Resolve",)

_CALL = re.compile(r"^(?P<tid>\d+) +(?P<call>connect|sendto|sendmsg|sendmmsg)\((?P<args>.*)$")
_FAMILY = re.compile(r"\{sa_family=(?P<family>AF_[A-Z0-9]+)")
_INET = re.compile(
    r"\{sa_family=AF_INET6?, sin6?_port=htons\((?P<port>\d+)\).*?"
    r"(?:inet_addr\(\"(?P<v4>[^\"]+)\"\)|inet_pton\(AF_INET6, \"(?P<v6>[^\"]+)\")"
)
_UNIX = re.compile(r"sun_path=@?\"(?P<path>(?:[^\"\\]|\\.)*)\"")
_PAYLOAD = re.compile(r"^\d+, \"(?P<data>(?:[^\"\\]|\\.)*)\"")


@dataclass(frozen=True)
class Contact:
    """One system call that gave a socket an address, or sent on one."""

    call: str
    family: str  # "inet", "unix", "other"
    address: str
    port: int | None
    line: str


def _unescape(text: str) -> bytes:
    """strace's C string escapes (with -x: \\xNN for what is not printable) as bytes."""
    out, i = bytearray(), 0
    simple = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "\\": 92, '"': 34}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x":
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            digits = re.match(r"[0-7]{1,3}", text[i + 1 :])
            if digits:
                out.append(int(digits.group(), 8))
                i += 1 + len(digits.group())
                continue
        out.append(ord(text[i]) & 0xFF)
        i += 1
    return bytes(out)


def contacts(trace: str) -> list[Contact]:
    """Every connect/send in an ``strace -f -x`` log that names an address or carries data.

    Netlink messages (the kernel's routing and neighbour tables, which Thunderbird's network
    link service reads) stay on this computer, whatever addresses they mention.
    """
    found = []
    for line in trace.splitlines():
        match = _CALL.match(line)
        if not match:
            continue
        call, args = match["call"], match["args"]
        family = _FAMILY.search(args)
        if family is None:
            if call != "connect" and (payload := _PAYLOAD.match(args)):
                # a send on a connected socket: its data, to recognise an nscd host request
                found.append(Contact(call, "other", payload["data"], None, line))
            continue
        if family["family"] in {"AF_INET", "AF_INET6"}:
            inet = _INET.match(args, family.start())
            if inet:
                address = inet["v4"] or inet["v6"]
                found.append(Contact(call, "inet", address, int(inet["port"]), line))
            else:  # an address this parser does not understand: never silently
                found.append(Contact(call, "inet", "?", None, line))
        elif family["family"] == "AF_UNIX" and (unix := _UNIX.search(args, family.start())):
            found.append(Contact(call, "unix", unix["path"], None, line))
    return found


def _dns_question(data: bytes) -> str | None:
    """The name a DNS query asks for, or None if ``data`` is not one."""
    if len(data) < 17 or data[2] & 0x80:  # too short, or a response
        return None
    labels, i = [], 12
    while i < len(data) and data[i]:
        n = data[i]
        labels.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels) if labels else None


def _pid_fd(line: str) -> tuple[str, str] | None:
    """(thread, socket) of an ``strace -f`` line such as ``123 sendto(10, ...``."""
    m = re.match(r"(?:\[pid\s+)?(\d+)\]?\s+\w+\((\d+),", line)
    return (m[1], m[2]) if m else None


def _own_name_unlisted() -> str | None:
    """This machine's host name, if /etc/hosts does not list it (a bare chroot: Debian's
    installer always writes ``127.0.1.1 HOSTNAME``)."""
    name = socket.gethostname()
    try:
        hosts = Path("/etc/hosts").read_text().split()
    except OSError:
        hosts = []
    return None if name in hosts else name


def leaks(trace: str) -> list[str]:
    """The lines of ``trace`` that reach beyond this computer or ask anyone for a name.

    One lookup is not Thunderbird's to avoid: its profile lock resolves this machine's own
    host name through libc. A real Debian machine answers that from /etc/hosts; only where
    the host name is missing there (a bare chroot) does it become a DNS query, and then only
    a query for that exact name is excused."""
    bad = []
    own = _own_name_unlisted()
    found = contacts(trace)
    dns_sockets = {_pid_fd(c.line) for c in found if c.family == "inet" and c.port == 53}
    asked = {
        _dns_question(_unescape(c.address))
        for c in found
        if c.family == "other" and _pid_fd(c.line) in dns_sockets
    }
    excused = own is not None and bool(asked) and asked <= {own}
    for c in found:
        if c.family == "inet":
            if c.port == 53:
                if not excused:
                    bad.append(f"DNS query: {c.line}")
                continue
            try:
                loopback = ipaddress.ip_address(c.address).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                bad.append(f"connection beyond this computer: {c.line}")
        elif c.family == "unix" and c.address.startswith(RESOLVED_SOCKETS):
            bad.append(f"name lookup through systemd-resolved: {c.line}")
        elif c.family == "other":
            data = _unescape(c.address)
            if (
                len(data) >= 8
                and int.from_bytes(data[:4], "little") == 2
                and int.from_bytes(data[4:8], "little") in NSCD_HOST_REQUESTS
            ):
                bad.append(f"host lookup through nscd: {c.line}")
    return bad


def dead_end_hits(trace: str) -> int:
    """How many connections ended at the dead-end proxy (services user.js could not stop)."""
    return sum(
        1
        for c in contacts(trace)
        if c.call == "connect"
        and c.family == "inet"
        and c.port == DEAD_END_PROXY_PORT
        and c.address in {"127.0.0.1", "::1"}
    )


# --- Thunderbird under strace -----------------------------------------------------------------

SAVE_LOGINS = """
const [user, password] = arguments;
const logins = ["imap", "smtp"].map(scheme => {
  const origin = `${scheme}://127.0.0.1`;
  const login = Cc["@mozilla.org/login-manager/loginInfo;1"].createInstance(Ci.nsILoginInfo);
  login.init(origin, null, origin, user, password, "", "");
  return login;
});
Services.logins.addLogins(logins).then(() => resolve(true));
"""

CHECK_POLICIES = """
// What Thunderbird does with a policies.json at start-up (EnterprisePoliciesParent
// _activatePolicies), without installing it: each policy must be known, valid, implemented.
const [policies] = arguments;
const { schema } = ChromeUtils.importESModule("resource:///modules/policies/schema.sys.mjs");
const { PolicySchemaValidator } = ChromeUtils.importESModule(
  "resource:///modules/policies/PolicySchemaValidator.sys.mjs");
const { Policies } = ChromeUtils.importESModule("resource:///modules/policies/Policies.sys.mjs");
const problems = [];
for (const [name, value] of Object.entries(policies)) {
  const policySchema = schema.properties[name];
  if (!policySchema) { problems.push(`unknown policy ${name}`); continue; }
  const { valid, error } = PolicySchemaValidator.validate(value, policySchema,
    { allowAdditionalProperties: false, policyName: name });
  if (!valid) problems.push(`${name}: ${error.message}`);
  if (!Policies[name]) problems.push(`${name} is not implemented`);
}
return problems;
"""


class WatchedThunderbird:
    """Thunderbird 153 on a fresh profile, headless, with no Marionette, under strace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.profile = root / "profile"
        self.home = root / "home"
        self.trace_path = root / "strace.log"
        self.log_path = root / "thunderbird.log"
        self.moz_log_base = root / "moz"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.profile.mkdir(parents=True)
        self.home.mkdir()

    def start(self) -> None:
        thunderbird = require("thunderbird", "thunderbird")
        strace = require("strace", "strace")
        env = {
            **os.environ,
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            # IMAP: the login and IDLE; nsHttp: the URL of every HTTP request, which names the
            # service behind a connection that the dead-end proxy stopped.
            "MOZ_LOG": "IMAP:5,nsHttp:3,timestamp,sync",
            "MOZ_LOG_FILE": str(self.moz_log_base),
        }
        argv = [strace, "-f", "-qq", "-x", "-s", "64", "-o", str(self.trace_path)]
        argv += ["-e", "trace=connect,sendto,sendmsg,sendmmsg"]
        argv += [thunderbird, "--headless", "--no-remote", "--profile", str(self.profile)]
        with self.log_path.open("wb") as log:
            # Its own process group, so that stopping it also stops its content processes.
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # Thunderbird quits on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # leftover content processes
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"Thunderbird exited with {self.proc.returncode}.\n{self.output()}")
        return True

    def moz_log(self) -> str:
        """Thunderbird's MOZ_LOG (the parent process's file; children add suffixes)."""
        path = self.moz_log_base.with_name(self.moz_log_base.name + ".moz_log")
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def trace(self) -> str:
        try:
            return self.trace_path.read_text(errors="replace")
        except OSError:
            return ""

    def imap_commands(self) -> list[str]:
        return re.findall(r"S-INBOX:SendData: (.*)", self.moz_log())

    def idling(self) -> bool:
        commands = self.imap_commands()
        return bool(commands) and re.fullmatch(r"\d+ IDLE", commands[-1].strip()) is not None

    def http_hosts(self) -> set[str]:
        """Hosts of the HTTP(S) requests Thunderbird made (nsHttp's log names each URI)."""
        return set(re.findall(r"uri=[a-z]+://([^/:\s]+)", self.moz_log()))

    def output(self) -> str:
        noise = ("Gtk-CRITICAL", "glib warning", "Gtk-WARNING", "GLib-GObject")
        imap = [line for line in self.moz_log().splitlines() if "SendData" in line][-15:]
        return (
            f"--- Thunderbird output ({self.log_path}) ---\n"
            + tail(self.log_path, 30, skip=noise)
            + "\n--- Thunderbird's IMAP commands ---\n"
            + "\n".join(imap)
        )


@pytest.fixture
def node(mail_tmp: Path) -> Iterator[Node]:
    n = Node(mail_tmp)  # as root, Dovecot's mail account must pass through
    n.add_user("alice")
    n.add_user("carol")
    n.start()
    yield n
    n.stop()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[WatchedThunderbird]:
    tb = WatchedThunderbird(tmp_path / "watched")
    yield tb
    tb.stop()


def prepare_profile(node: Node, root: Path, profile: Path) -> None:
    """Trust the CA and save alice's password in a throw-away profile; copy both into ``profile``.

    Also checks the generated policies.json against Thunderbird's own policy code.
    """
    prep = Thunderbird(root)
    try:
        prep.start()
        prep.trust_ca_and_save_logins(
            (node.thunderbird_dir / "onionpost-ca.pem").read_text(),
            "alice",
            node.passwords["alice"],
        )
        policies = json.loads((node.thunderbird_dir / "policies.json").read_text())["policies"]
        problems = prep.js(CHECK_POLICIES, policies)
        assert not problems, f"Thunderbird would reject parts of policies.json: {problems}"
        prep.quit()
        for name in ("cert9.db", "key4.db", "logins.json"):
            shutil.copy(prep.profile / name, profile / name)
    finally:
        prep.remove()


def test_thunderbird_contacts_only_the_gateway(
    node: Node, watched: WatchedThunderbird, tmp_path: Path
) -> None:
    user_js = node.write_thunderbird_files("alice")
    prepare_profile(node, tmp_path / "prep", watched.profile)
    (watched.profile / "user.js").write_text(user_js)

    def explain() -> str:
        return f"{watched.output()}\n{node.log(20)}"

    watched.start()
    # (1) It starts, logs in over STARTTLS with the saved password and idles on INBOX.
    wait_for(
        "Thunderbird to log in and IDLE on INBOX",
        lambda: watched.running() and watched.idling(),
        timeout=180,
        explain=explain,
        interval=0.2,
    )
    login_after = time.monotonic() - watched.started
    # (2) New mail from carol reaches it by IDLE (it fetches the new message's headers).
    fetches = len(re.findall(r"fetch", " ".join(watched.imap_commands()), re.IGNORECASE))
    node.send("carol", "alice", "leak test", "Nothing but the gateway, please.")

    def fetched() -> bool:
        commands = " ".join(watched.imap_commands())
        return watched.running() and len(re.findall(r"fetch", commands, re.IGNORECASE)) > fetches

    wait_for("Thunderbird to fetch carol's message", fetched, timeout=60, explain=explain)
    # (3) It idles on past the first round of its update timers.
    remaining = WATCH_AT_LEAST - (time.monotonic() - watched.started)
    if remaining > 0:
        time.sleep(remaining)
    watched.running()
    watched.stop()

    trace = watched.trace()
    assert contacts(trace), f"strace recorded nothing; is it working?\n{trace[-2000:]}"
    assert any(c.family == "inet" and c.port == node.imap_port for c in contacts(trace)), (
        "the trace does not show the IMAP connection, so it cannot show the others either"
    )
    found = leaks(trace)
    assert not found, (
        "Thunderbird tried to reach beyond this computer:\n"
        + "\n".join(found[:30])
        + f"\n(HTTP requests it made: {sorted(watched.http_hosts())})"
    )
    stopped = watched.http_hosts() - {"127.0.0.1", "localhost"}
    assert stopped <= NO_SWITCH, (
        f"Services that user.js should switch off reached the dead-end proxy: "
        f"{sorted(stopped - NO_SWITCH)}"
    )
    print(
        f"Thunderbird logged in after {login_after:.1f} s, was watched for "
        f"{time.monotonic() - watched.started:.0f} s: no connection beyond loopback, no DNS; "
        f"{dead_end_hits(trace)} connection(s) stopped at the dead-end proxy "
        f"({', '.join(sorted(stopped)) or 'none'})"
    )


def test_the_trace_parser_tells_leaks_from_local_traffic() -> None:
    """The parser itself, on lines as strace -f -x writes them (no Thunderbird needed)."""
    local = "\n".join(
        [
            '11 connect(5, {sa_family=AF_INET, sin_port=htons(1143), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',  # noqa: E501
            "11 connect(6, {sa_family=AF_INET6, sin6_port=htons(1587), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
            '12 connect(7, {sa_family=AF_UNIX, sun_path="/run/dbus/system_bus_socket"}, 110) = 0',
            "13 sendmsg(8, {msg_name={sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}, "
            '..., [{nla_len=8, nla_type=RTA_DST}, inet_addr("23.219.91.27")]], ...}, 0) = 36',
            '14 sendto(9, "\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x06\\x00\\x00\\x00alice", 17, '
            "MSG_NOSIGNAL, NULL, 0) = 17",
            '15 connect(10, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}, 16) = -1',  # noqa: E501
        ]
    )
    assert leaks(local) == []
    assert dead_end_hits(local) == 1
    bad = [
        '21 connect(5, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("10.0.0.8")}, 16) = 0',  # noqa: E501
        '22 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0',  # noqa: E501
        "23 sendmmsg(6, [{msg_hdr={msg_name={sa_family=AF_INET6, sin6_port=htons(53), "
        'sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2001:db8::1", &sin6_addr)}}}], 2, 0) = 2',
        '24 connect(7, {sa_family=AF_UNIX, sun_path="/run/systemd/resolve/io.systemd.Resolve"}, 42) = 0',  # noqa: E501
        '25 sendto(8, "\\x02\\x00\\x00\\x00\\x0e\\x00\\x00\\x00\\x0c\\x00\\x00\\x00'
        'example.org", 23, MSG_NOSIGNAL, NULL, 0) = 23',
    ]
    assert [line.split(": ", 1)[1] for line in leaks("\n".join(bad))] == bad
