"""Mail-client setup for the gateway, without Thunderbird's account wizard.

The wizard is a privacy leak for onion addresses: given ``alice@<onion>.onion`` it runs, in
parallel, a lookup at Mozilla's ISP database (live.thunderbird.net), a DNS MX query for the
onion domain (through the system resolver, which ``network.dns.blockDotOnion`` does not
cover), and Exchange autodiscovery; each tells a third party the address.  So the gateway
offers three things instead, all pure text made here:

* :func:`render_user_js`: prefs that create the IMAP account, the identity and the SMTP
  server directly, point ``mailnews.auto_config_url`` at the gateway's own autoconfig
  endpoint, switch the Internet lookups and identifying headers off, and switch off
  Thunderbird's own connections to Mozilla (telemetry, updates, remote settings, ...), with a
  dead-end proxy on loopback for whatever has no switch;
* :func:`render_policies`: an enterprise ``policies.json`` that installs the gateway's local
  CA (Thunderbird accepts a leaf signed by a CA it trusts, not a trusted self-signed leaf) and
  locks the same Mozilla services off where Thunderbird has a policy for them;
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

from onionpost.core.address import Address
from onionpost.core.errors import UsageError

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


#: Where Thunderbird's own services are sent instead of to Mozilla: the discard port on this
#: computer.  Nothing answers there, so a request that some switch below failed to stop ends
#: in a refused connection to loopback instead of in a DNS query and a connection to Mozilla.
DEAD_END_PROXY_PORT = 9

_PrefValue = str | int | bool

#: Thunderbird's own connections to Mozilla (and Google, for Safe Browsing), switched off.
#: Each is (heading, ((pref, value, why), ...)).  For a profile that reads onion mail every such
#: connection is a leak: it tells Mozilla, the DNS resolver and the network that this computer
#: runs Thunderbird, when, and often its version, language and region.  The names are those
#: Thunderbird 153 ESR reads (its omni.ja, libxul's static prefs, mail/ and toolkit/ sources).
_PRIVACY_PREFS: tuple[tuple[str, tuple[tuple[str, _PrefValue, str], ...]], ...] = (
    (
        "Telemetry and data reporting (Glean and legacy telemetry, and the Sentry error reports "
        "of the built-in Thunderbird Pro add-on, which follow these switches).",
        (
            ("datareporting.policy.dataSubmissionEnabled", False, "master switch for every upload"),
            ("datareporting.healthreport.uploadEnabled", False, "Glean and health report upload"),
            ("datareporting.usage.uploadEnabled", False, "the daily usage ping"),
            (
                "datareporting.policy.dataSubmissionPolicyBypassNotification",
                True,
                "no data-reporting notice (it links to a Mozilla page)",
            ),
            ("toolkit.telemetry.enabled", False, "extended telemetry collection"),
            ("toolkit.telemetry.unified", False, "unified telemetry collection"),
            ("toolkit.telemetry.archive.enabled", False, "no local ping archive either"),
            ("toolkit.telemetry.newProfilePing.enabled", False, "the new-profile ping"),
            ("toolkit.telemetry.firstShutdownPing.enabled", False, "the first-shutdown ping"),
            (
                "toolkit.telemetry.shutdownPingSender.enabled",
                False,
                "the pingsender process at shutdown",
            ),
            ("toolkit.telemetry.updatePing.enabled", False, "the ping after an update"),
            ("toolkit.telemetry.bhrPing.enabled", False, "hang reports"),
            ("toolkit.telemetry.dap_enabled", False, "privacy-preserving measurement (DAP)"),
            ("toolkit.telemetry.server", "data:,", "should a ping still be sent: nowhere"),
        ),
    ),
    (
        "Crash reports (Debian builds Thunderbird without the crash reporter; other builds "
        "have it).",
        (
            ("breakpad.reportURL", "", "no crash report links"),
            (
                "browser.crashReports.unsubmittedCheck.autoSubmit2",
                False,
                "never send pending crash reports",
            ),
        ),
    ),
    (
        "First-run, start and what's-new pages: web pages from live.thunderbird.net.",
        (
            ("mailnews.start_page.enabled", False, "no start page in the first tab"),
            ("mailnews.start_page.url", "", "and nothing to load should it open"),
            ("mailnews.start_page.override_url", "", "no what's-new page after an update"),
            ("datareporting.policy.firstRunURL", "", "no privacy-notice page at the first run"),
        ),
    ),
    (
        "Application, add-on, system add-on and media plugin (OpenH264) updates: daily checks "
        "at Mozilla's servers.  Debian updates Thunderbird and its add-ons through apt.",
        (
            ("app.update.auto", False, "no automatic application updates"),
            ("app.update.checkInstallTime", False, "no nagging about an old installation"),
            ("app.update.langpack.enabled", False, "no language-pack updates"),
            ("extensions.update.enabled", False, "no add-on update checks"),
            ("extensions.update.autoUpdateDefault", False, "no automatic add-on updates"),
            ("extensions.update.url", "", "the add-on update service"),
            ("extensions.update.background.url", "", "the background add-on update service"),
            ("extensions.systemAddon.update.enabled", False, "no system add-on updates"),
            ("extensions.systemAddon.update.url", "", "the system add-on update service"),
            (
                "extensions.getAddons.cache.enabled",
                False,
                "no daily add-on metadata fetch from addons.thunderbird.net",
            ),
            (
                "extensions.htmlaboutaddons.recommendations.enabled",
                False,
                "no recommendations in the add-ons manager",
            ),
            ("extensions.abuseReport.enabled", False, "no add-on abuse reports"),
            ("media.gmp-provider.enabled", False, "no media plugins (OpenH264, Widevine)"),
            ("media.gmp-manager.updateEnabled", False, "no media plugin update checks"),
            ("media.gmp-manager.url", "", "the media plugin update service"),
            ("media.gmp-gmpopenh264.enabled", False, "no OpenH264 download"),
            ("media.gmp-gmpopenh264.autoupdate", False, "no OpenH264 updates"),
        ),
    ),
    (
        "Safe Browsing: list downloads and hash lookups at Google, for web pages this profile "
        "does not show (mail's own phishing check is local and stays on).",
        (
            ("browser.safebrowsing.malware.enabled", False, "no malware lists"),
            ("browser.safebrowsing.phishing.enabled", False, "no phishing lists"),
            ("browser.safebrowsing.blockedURIs.enabled", False, "no blocked-URI lists"),
            ("browser.safebrowsing.downloads.enabled", False, "no download checks"),
            (
                "browser.safebrowsing.downloads.remote.enabled",
                False,
                "no download lookups at Google",
            ),
            ("browser.safebrowsing.downloads.remote.url", "", "the download lookup service"),
            ("browser.safebrowsing.provider.google.updateURL", "", "list downloads (v2)"),
            ("browser.safebrowsing.provider.google.gethashURL", "", "hash lookups (v2)"),
            ("browser.safebrowsing.provider.google4.updateURL", "", "list downloads (v4)"),
            ("browser.safebrowsing.provider.google4.gethashURL", "", "hash lookups (v4)"),
            ("browser.safebrowsing.provider.google4.dataSharingURL", "", "threat-hit reports"),
            ("browser.safebrowsing.provider.google5.updateURL", "", "list downloads (v5)"),
            ("browser.safebrowsing.provider.google5.gethashURL", "", "hash lookups (v5)"),
            (
                "browser.safebrowsing.provider.mozilla.gethashURL",
                "",
                "tracking-list hash lookups at Mozilla",
            ),
        ),
    ),
    (
        "Remote settings (blocklists, certificate revocation lists and other data that "
        "Thunderbird fetches from thunderbird-settings.thunderbird.net).  Release builds ignore "
        "a changed services.settings.server, so each user of it is switched off, and the "
        "proxy below stops the rest.",
        (
            ("extensions.blocklist.enabled", False, "no add-on blocklist downloads"),
            (
                "security.remote_settings.intermediates.enabled",
                False,
                "no intermediate-certificate downloads",
            ),
            (
                "security.remote_settings.crlite_filters.enabled",
                False,
                "no CRLite revocation filter downloads",
            ),
            ("security.pki.crlite_mode", 0, "and no use of CRLite"),
            (
                "privacy.fingerprintingProtection.remoteOverrides.enabled",
                False,
                "no fingerprinting-protection override lists",
            ),
            ("privacy.query_stripping.enabled", False, "no query-stripping lists"),
            ("browser.search.update", False, "no search engine updates"),
            ("browser.region.update.enabled", False, "no region updates"),
            (
                "signon.management.page.breach-alerts.enabled",
                False,
                "no breach-alert lists for saved passwords",
            ),
            ("services.settings.poll_interval", 2147483647, "no periodic remote settings poll"),
        ),
    ),
    (
        "Studies: Thunderbird 153 has no Normandy or Nimbus; should a later version bring them, "
        "these keep them off.",
        (
            ("app.normandy.enabled", False, "no Normandy recipes"),
            ("app.shield.optoutstudies.enabled", False, "no opt-out studies"),
            ("nimbus.rollouts.enabled", False, "no Nimbus rollouts"),
        ),
    ),
    (
        "Location: the network geolocation service (Google) and the region lookup "
        "(location.services.mozilla.com), which Thunderbird makes at the first start.",
        (
            ("geo.enabled", False, "no geolocation at all"),
            ("geo.provider.network.url", "", "the network geolocation service"),
            ("geo.provider.use_geoclue", False, "nor the system's location service"),
            ("browser.region.network.url", "", "the region lookup at the first start"),
            ("browser.region.local-geocoding", False, "no geocoding data download"),
        ),
    ),
    (
        "DNS: no DNS over HTTPS (a third resolver, and its confirmation queries), no prefetch "
        "of names in messages, no speculative connections.",
        (
            ("network.trr.mode", 5, "DNS over HTTPS off by choice"),
            ("network.trr.uri", "", "no DNS-over-HTTPS resolver"),
            ("network.trr.confirmationNS", "skip", "no DNS-over-HTTPS confirmation query"),
            ("network.dns.disablePrefetch", True, "no DNS prefetch of names in messages"),
            ("network.dns.disablePrefetchFromHTTPS", True, "nor from secure pages"),
            ("network.dns.native_https_query", False, "no HTTPS-record DNS queries"),
            ("network.prefetch-next", False, "no link prefetch"),
            ("network.http.speculative-parallel-limit", 0, "no speculative connections"),
        ),
    ),
    (
        "Captive-portal and connectivity checks: requests to detectportal.firefox.com and DNS "
        "queries for example.org and cloudflare-dns.com.",
        (
            ("network.captive-portal-service.enabled", False, "no captive-portal detection"),
            ("captivedetect.canonicalURL", "", "the captive-portal check page"),
            ("network.connectivity-service.enabled", False, "no connectivity checks"),
            ("network.connectivity-service.IPv4.url", "", "the IPv4 check"),
            ("network.connectivity-service.IPv6.url", "", "the IPv6 check"),
        ),
    ),
    (
        "OCSP: certificate status queries to the CA of every TLS server.  The gateway's local "
        "CA has no OCSP responder, and this profile talks to no other TLS server.",
        (
            ("security.OCSP.enabled", 0, "no OCSP queries"),
            ("security.OCSP.require", False, "so no failure for the lack of one"),
        ),
    ),
    (
        "In-app notifications (news, donation appeals and surveys from "
        "notifications.thunderbird.net), "
        "push, the Thundermail sign-up in the account hub and the OpenPGP key servers.",
        (
            ("mail.inappnotifications.enabled", False, "no in-app notifications"),
            ("mail.inappnotifications.url", "", "the notification feed"),
            ("mail.inappnotifications.donation_enabled", False, "no donation appeals"),
            ("mail.inappnotifications.blog_enabled", False, "no surveys"),
            ("mail.inappnotifications.message_enabled", False, "no messages"),
            ("dom.push.enabled", False, "no web push"),
            ("dom.push.connection.enabled", False, "no push server connection"),
            ("dom.push.serverURL", "", "the push server"),
            (
                "mail.accounthub.thundermail.enabled",
                False,
                "no Thundermail account offer in the account hub",
            ),
            (
                "mail.openpgp.keyserver_list",
                "",
                "no key server lookups, which would send recipients' addresses",
            ),
        ),
    ),
    (
        "Remote content in messages: images, fonts and style sheets from the web tell the "
        "sender when and where a message was read.",
        (
            ("mailnews.message_display.disable_remote_image", True, "no remote content"),
            ("mail.chat.enabled", False, "no chat (its accounts would connect to chat servers)"),
        ),
    ),
)


def _privacy_lines() -> list[str]:
    """The ``_PRIVACY_PREFS`` as user.js lines, each with its reason."""
    lines = [
        "// Thunderbird's own connections to Mozilla and Google, switched off: for a profile",
        "// that reads onion mail each would tell them (and the DNS resolver, and the network)",
        "// that this computer runs Thunderbird, and when.  Checked by",
        "// tests/clients/test_thunderbird_privacy.py, which watches every connect() it makes.",
    ]
    for heading, prefs in _PRIVACY_PREFS:
        lines += ["", *(f"// {line}" for line in textwrap.wrap(heading, _WIDTH - 3))]
        lines += [f"{_pref(name, value)}  // {why}" for name, value, why in prefs]
    lines += [
        "",
        "// The safety net: send whatever is left through a proxy that does not exist, so that",
        "// it fails on this computer.  Names are resolved by the proxy (so not at all), and",
        "// 127.0.0.1, where the gateway listens, is never proxied.  Mail reaches the gateway;",
        "// nothing else goes anywhere.  (Thunderbird opens links in messages in the system's",
        "// browser, which this does not affect.)",
        f"{_pref('network.proxy.type', 1)}  // manual proxy settings",
        f"{_pref('network.proxy.socks', LOOPBACK)}  // a SOCKS proxy on this computer",
        f"{_pref('network.proxy.socks_port', DEAD_END_PROXY_PORT)}  // where nothing listens",
        f"{_pref('network.proxy.socks_version', 5)}  // SOCKS 5, which resolves names itself",
        f"{_pref('network.proxy.socks5_remote_dns', True)}  // so no DNS query here",
        f"{_pref('network.proxy.socks_remote_dns', True)}  // (the SOCKS 4 switch, too)",
        f"{_pref('network.proxy.share_proxy_settings', False)}  // no HTTP proxy besides",
        f"{_pref('network.proxy.failover_direct', False)}  // never around the proxy",
        # remote settings and telemetry retry a failed request without the proxy otherwise
        f"{_pref('network.proxy.allow_bypass', False)}  // not even on a retry",
        f"{_pref('network.proxy.allow_hijacking_localhost', False)}  // loopback stays direct",
    ]
    return lines


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
        "",
        *_privacy_lines(),
    ]
    return "\n".join(lines) + "\n"


#: Enterprise policies that switch Mozilla's services off in every profile, locked, so that
#: neither an add-on nor a stray click in Settings turns them back on.  They repeat what the
#: user.js prefs do where Thunderbird has a policy for it; the Preferences policy accepts only
#: some prefixes (not security.*, toolkit.*, datareporting.*), hence only these prefs.
_PRIVACY_POLICIES: dict[str, object] = {
    "DisableTelemetry": True,  # locks health report, data submission and archive off
    "DisableAppUpdate": True,  # no update checks (Debian updates through apt)
    "AppAutoUpdate": False,  # nor automatic downloads, should a build have an updater
    "DisableSystemAddonUpdate": True,  # no system add-on updates
    "ExtensionUpdate": False,  # no add-on update checks at addons.thunderbird.net
    "CaptivePortal": False,  # no captive-portal checks at detectportal.firefox.com
    "NetworkPrediction": False,  # no DNS prefetch
    "DNSOverHTTPS": {"Enabled": False, "Locked": True},  # no third resolver
    # no news, donation appeals or surveys from notifications.thunderbird.net
    "InAppNotification": {
        "Disabled": True,
        "DonationEnabled": False,
        "SurveyEnabled": False,
        "MessageEnabled": False,
    },
    "Preferences": {
        # the region lookup and geolocation at location.services.mozilla.com and Google
        "browser.region.network.url": {"Value": "", "Status": "locked"},
        "browser.region.update.enabled": {"Value": False, "Status": "locked"},
        "geo.enabled": {"Value": False, "Status": "locked"},
        # connectivity checks at detectportal.firefox.com
        "network.connectivity-service.enabled": {"Value": False, "Status": "locked"},
        # the daily add-on metadata fetch, media plugin (OpenH264) downloads
        "extensions.getAddons.cache.enabled": {"Value": False, "Status": "locked"},
        "media.gmp-provider.enabled": {"Value": False, "Status": "locked"},
        "media.gmp-manager.updateEnabled": {"Value": False, "Status": "locked"},
        # Safe Browsing list downloads at Google
        "browser.safebrowsing.malware.enabled": {"Value": False, "Status": "locked"},
        "browser.safebrowsing.phishing.enabled": {"Value": False, "Status": "locked"},
        "browser.safebrowsing.downloads.remote.enabled": {"Value": False, "Status": "locked"},
    },
}


def render_policies(ca_path: PurePath) -> str:
    """A ``policies.json`` that makes Thunderbird trust the gateway's local CA.

    Thunderbird reads it system-wide only (``/etc/thunderbird/policies/policies.json`` on
    Debian, or ``distribution/policies.json`` next to the program), so installing it needs
    root.  The CA's name constraints limit it to 127.0.0.0/8, ::1 and localhost, which is
    what makes trusting it for the whole system acceptable.  A relative path would be looked
    up in Mozilla's certificate directories instead, so only an absolute one is accepted.

    It also switches off, locked and for every profile, the Mozilla services that Thunderbird
    has a policy for (:data:`_PRIVACY_POLICIES`): a profile without onionpost's user.js, or
    whose user.js was deleted, then still does not report to Mozilla.  None of them costs
    mail anything.
    """
    if not ca_path.is_absolute():
        raise UsageError(f"The CA certificate path must be absolute, not {str(ca_path)!r}.")
    policies = {"policies": {"Certificates": {"Install": [str(ca_path)]}, **_PRIVACY_POLICIES}}
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
