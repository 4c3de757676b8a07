"""Mail-client setup for the gateway, without Thunderbird's account wizard.

The wizard is a privacy leak for onion addresses: given ``alice@<onion>.onion`` it runs, in
parallel, a lookup at Mozilla's ISP database (live.thunderbird.net), a DNS MX query for the
onion domain (through the system resolver, which ``network.dns.blockDotOnion`` does not
cover), and Exchange autodiscovery; each tells a third party the address.  So the gateway
offers three things instead, all pure text made here:

* :func:`render_user_js`: prefs that create the IMAP account, the identity and the SMTP
  server directly, point ``mailnews.auto_config_url`` at the gateway's own autoconfig
  endpoint, and switch the Internet lookups and identifying headers off;
* :func:`render_policies`: an enterprise ``policies.json`` that installs the gateway's local
  CA (Thunderbird accepts a leaf signed by a CA it trusts, not a trusted self-signed leaf);
* :func:`render_settings`: the same values as text, for people configuring any client by
  hand; and :func:`render_autoconfig_xml`, the ``config-v1.1.xml`` the endpoint serves.

The pref names are those Thunderbird 153 ESR reads (checked in its ``omni.ja``):
``MailServices.outgoingServer`` still keeps SMTP servers under ``mail.smtpservers`` and
``mail.smtpserver.<key>.*`` (``mail.outgoingserver.<key>.*`` is only for EWS servers), the
default is ``mail.smtp.defaultserver``, and an identity names its server in
``mail.identity.<key>.smtpServer``.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import quote

from onionpost.address import Address
from onionpost.errors import UsageError

__all__ = [
    "LOOPBACK",
    "GatewaySettings",
    "render_autoconfig_xml",
    "render_policies",
    "render_settings",
    "render_user_js",
]

LOOPBACK = "127.0.0.1"

# nsMsgSocketType and nsMsgAuthMethod values (mailnews/base/public/MailNewsTypes2.idl).
_SOCKET_STARTTLS = 2
_AUTH_CLEARTEXT_PASSWORD = 3
_LOCAL_FOLDERS_ACCOUNT = "onionpost_localfolders"
_LOCAL_FOLDERS_SERVER = "onionpost_localfolders_server"
_WIDTH = 88


@dataclass(frozen=True)
class GatewaySettings:
    """Everything a mail client needs to reach one user's mailbox through the gateway."""

    address: Address
    imap_port: int
    smtp_port: int
    autoconfig_port: int
    ca_path: PurePath
    require_tls: bool
    host: str = LOOPBACK
    full_name: str = ""

    @property
    def user(self) -> str:
        """The gateway login name (the whole address works too)."""
        return self.address.local

    @property
    def autoconfig_url(self) -> str:
        """For ``mailnews.auto_config_url``; Thunderbird replaces ``{{domain}}``."""
        return f"http://{self.host}:{self.autoconfig_port}/v1.1/{{{{domain}}}}.xml"


def render_autoconfig_xml(
    domains: Sequence[str], *, imap_port: int, smtp_port: int, host: str = LOOPBACK
) -> str:
    """Thunderbird's ``config-v1.1.xml`` for the gateway, listing ``domains``."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domains[0] if domains else "onionpost")
    for domain in domains:
        ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = "onionpost (gateway on this computer)"
    ET.SubElement(provider, "displayShortName").text = "onionpost"
    for tag, kind, port in (
        ("incomingServer", "imap", imap_port),
        ("outgoingServer", "smtp", smtp_port),
    ):
        server = ET.SubElement(provider, tag, type=kind)
        ET.SubElement(server, "hostname").text = host
        ET.SubElement(server, "port").text = str(port)
        ET.SubElement(server, "socketType").text = "STARTTLS"
        ET.SubElement(server, "username").text = "%EMAILLOCALPART%"
        ET.SubElement(server, "authentication").text = "password-cleartext"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _key(address: Address) -> str:
    """A pref-safe, stable key part: pref names use "." as a separator, local parts may not."""
    readable = re.sub(r"[^a-z0-9]+", "_", address.local).strip("_") or "user"
    tag = hashlib.sha256(str(address).encode()).hexdigest()[:6]
    return f"{readable}_{tag}"


def _pref(name: str, value: str | int | bool) -> str:
    # A JSON string literal (ASCII, with \\u escapes) is also a valid prefs-file literal.
    return f"user_pref({json.dumps(name)}, {json.dumps(value)});"


def _encode_uri_component(text: str) -> str:
    """JavaScript's encodeURIComponent, which Thunderbird uses in server URIs."""
    return quote(text, safe="!'()*-._~")


def render_user_js(settings: GatewaySettings) -> str:
    """A ``user.js`` for a dedicated Thunderbird profile: the account, without the wizard."""
    key = _key(settings.address)
    account, server, identity, smtp = (
        f"onionpost_{key}",
        f"onionpost_{key}_imap",
        f"onionpost_{key}_id",
        f"onionpost_{key}_smtp",
    )
    user, host = settings.user, settings.host
    folder_base = f"imap://{_encode_uri_component(user)}@{_encode_uri_component(host)}/"
    lines = [
        f"// onionpost: Thunderbird account for {settings.address} through the local gateway.",
        "// Thunderbird applies user.js at every start, over the profile's own settings, so",
        "// use it for a profile of its own (thunderbird -P).  Once Thunderbird has started",
        "// with it, the account lives in prefs.js and this file may be deleted.",
        "",
        "// The account, its IMAP server and identity.",
        _pref("mail.accountmanager.accounts", f"{account},{_LOCAL_FOLDERS_ACCOUNT}"),
        _pref("mail.accountmanager.defaultaccount", account),
        _pref("mail.accountmanager.localfoldersserver", _LOCAL_FOLDERS_SERVER),
        _pref(f"mail.account.{account}.server", server),
        _pref(f"mail.account.{account}.identities", identity),
        _pref(f"mail.server.{server}.type", "imap"),
        _pref(f"mail.server.{server}.hostname", host),
        _pref(f"mail.server.{server}.port", settings.imap_port),
        _pref(f"mail.server.{server}.userName", user),
        _pref(f"mail.server.{server}.name", str(settings.address)),
        _pref(f"mail.server.{server}.socketType", _SOCKET_STARTTLS),
        _pref(f"mail.server.{server}.authMethod", _AUTH_CLEARTEXT_PASSWORD),
        _pref(f"mail.server.{server}.login_at_startup", True),
        _pref(f"mail.server.{server}.check_new_mail", True),
        _pref(f"mail.server.{server}.use_idle", True),
        _pref(f"mail.server.{server}.valid", True),
        _pref(f"mail.identity.{identity}.useremail", str(settings.address)),
        *(
            # user.js is re-applied at every start: an empty name would wipe one set later
            [_pref(f"mail.identity.{identity}.fullName", settings.full_name)]
            if settings.full_name
            else []
        ),
        _pref(f"mail.identity.{identity}.smtpServer", smtp),
        _pref(f"mail.identity.{identity}.valid", True),
        _pref(f"mail.identity.{identity}.fcc_folder", folder_base + "Sent"),
        _pref(f"mail.identity.{identity}.fcc_folder_picker_mode", "0"),
        _pref(f"mail.identity.{identity}.draft_folder", folder_base + "Drafts"),
        _pref(f"mail.identity.{identity}.drafts_folder_picker_mode", "0"),
        _pref(f"mail.identity.{identity}.archive_folder", folder_base + "Archive"),
        _pref(f"mail.identity.{identity}.archives_folder_picker_mode", "0"),
        # one flat Archive folder, not Archive/<year>
        _pref(f"mail.identity.{identity}.archive_granularity", 0),
        # show what onionpost verified (the sender's identity) in the message header view
        _pref("mailnews.headers.extraExpandedHeaders", "X-Onionpost-Verified"),
        "",
        "// The SMTP server (Thunderbird 153 keeps SMTP servers under mail.smtpserver.*).",
        _pref("mail.smtpservers", smtp),
        _pref("mail.smtp.defaultserver", smtp),
        _pref(f"mail.smtpserver.{smtp}.type", "smtp"),
        _pref(f"mail.smtpserver.{smtp}.hostname", host),
        _pref(f"mail.smtpserver.{smtp}.port", settings.smtp_port),
        _pref(f"mail.smtpserver.{smtp}.username", user),
        _pref(f"mail.smtpserver.{smtp}.try_ssl", _SOCKET_STARTTLS),
        _pref(f"mail.smtpserver.{smtp}.authMethod", _AUTH_CLEARTEXT_PASSWORD),
        _pref(f"mail.smtpserver.{smtp}.description", "onionpost gateway"),
        "",
        "// Local Folders, so that Thunderbird does not create a second one at every start.",
        _pref(f"mail.account.{_LOCAL_FOLDERS_ACCOUNT}.server", _LOCAL_FOLDERS_SERVER),
        _pref(f"mail.server.{_LOCAL_FOLDERS_SERVER}.type", "none"),
        _pref(f"mail.server.{_LOCAL_FOLDERS_SERVER}.hostname", "Local Folders"),
        _pref(f"mail.server.{_LOCAL_FOLDERS_SERVER}.userName", "nobody"),
        _pref(f"mail.server.{_LOCAL_FOLDERS_SERVER}.name", "Local Folders"),
        "",
        "// Account setup must not send the onion address to anyone: the settings come from",
        "// the gateway, and the ISP, guessing and Exchange lookups are off.  (The wizard's",
        "// DNS MX lookup has no switch, which is why the account is created above.)",
        _pref("mailnews.auto_config_url", settings.autoconfig_url),
        _pref("mailnews.auto_config.fetchFromISP.enabled", False),
        _pref("mailnews.auto_config.fetchFromISP.sendEmailAddress", False),
        _pref("mailnews.auto_config.fetchFromExchange.enabled", False),
        _pref("mailnews.auto_config.guess.enabled", False),
        _pref("mailnews.auto_config.addons_url", ""),
        "",
        "// Headers that would tell recipients the program, time zone and language in use.",
        _pref("mailnews.headers.sendUserAgent", False),
        _pref("mail.sanitize_date_header", True),
        _pref("mail.suppress_content_language", True),
        _pref("mailnews.start_page.enabled", False),
    ]
    return "\n".join(lines) + "\n"


def render_policies(ca_path: PurePath) -> str:
    """A ``policies.json`` that makes Thunderbird trust the gateway's local CA.

    Thunderbird reads it system-wide only (``/etc/thunderbird/policies/policies.json`` on
    Debian, or ``distribution/policies.json`` next to the program), so installing it needs
    root.  The CA's name constraints limit it to 127.0.0.0/8, ::1 and localhost, which is
    what makes trusting it for the whole system acceptable.  A relative path would be looked
    up in Mozilla's certificate directories instead, so only an absolute one is accepted.
    """
    if not ca_path.is_absolute():
        raise UsageError(f"The CA certificate path must be absolute, not {str(ca_path)!r}.")
    policies = {"policies": {"Certificates": {"Install": [str(ca_path)]}}}
    return json.dumps(policies, indent=2) + "\n"


def render_settings(settings: GatewaySettings) -> str:
    """The settings as a person types them into any mail client."""
    security = "STARTTLS"
    user = settings.user

    def server(title: str, port: int) -> list[str]:
        return [
            title,
            f"  Server:              {settings.host}",
            f"  Port:                {port}",
            f"  Connection security: {security}",
            "  Authentication:      Normal password",
            f"  User name:           {user}   (the whole address works too)",
        ]

    if settings.require_tls:
        tls_note = "The gateway requires STARTTLS before the password is sent."
    else:
        tls_note = (
            "The gateway also accepts plain connections from this computer, but STARTTLS "
            "keeps another program from posing as the gateway to collect your password."
        )
    paragraphs = [
        f"{tls_note} For STARTTLS the mail client must trust the gateway's own certificate "
        "authority, which can vouch only for 127.0.0.1, ::1 and localhost, so trusting it "
        "cannot be used against any other site. In Thunderbird: Settings > Privacy & "
        'Security > Manage Certificates > Authorities > Import, and tick "Trust this CA to '
        'identify websites"; or install the policies.json that `onionpost thunderbird` '
        "writes. The certificate:",
        "Do not let Thunderbird's account wizard look these settings up: for an .onion "
        "address it asks live.thunderbird.net, your DNS resolver and Exchange autodiscovery "
        "about the domain, which tells them your address. The user.js that `onionpost "
        "thunderbird` writes creates the account directly and turns those lookups off. The "
        "gateway also serves these settings (for Thunderbird's mailnews.auto_config_url) at:",
    ]
    lines = [
        "Mail settings for",
        f"  {settings.address}",
        "through the onionpost gateway on this computer (it accepts local connections only).",
        "",
        *server("Incoming mail (IMAP)", settings.imap_port),
        "",
        *server("Outgoing mail (SMTP)", settings.smtp_port),
        "",
        f"Password: the gateway password of {user} on this computer.",
        "",
        *textwrap.wrap(paragraphs[0], _WIDTH),
        f"  {settings.ca_path}",
        "",
        *textwrap.wrap(paragraphs[1], _WIDTH),
        f"  {settings.autoconfig_url}",
    ]
    return "\n".join(lines) + "\n"
