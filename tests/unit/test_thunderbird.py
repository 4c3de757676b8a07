"""Thunderbird setup without the wizard: user.js prefs, policies.json, config-v1.1.xml, text."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath

import pytest

from gateway.thunderbird import (
    GatewaySettings,
    render_autoconfig_xml,
    render_policies,
    render_settings,
    render_user_js,
)
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import UsageError

ONION_KEY = ed25519_public(SeededRandom(b"thunderbird")(32))
ALICE = Address.for_key("alice", ONION_KEY)
CA = PurePosixPath("/home/alice/.local/share/onionpost/tls/ca.pem")
_PREF = re.compile(r"user_pref\((\"(?:[^\"\\]|\\.)*\"), (.*?)\);(?:  // (.+))?")


def settings(address: Address = ALICE, **kw: object) -> GatewaySettings:
    values: dict[str, object] = {
        "imap_port": 1143,
        "smtp_port": 1587,
        "autoconfig_port": 8088,
        "ca_path": CA,
        "require_tls": False,
        "full_name": "Alice Liddell",
    }
    values.update(kw)
    return GatewaySettings(address, **values)  # type: ignore[arg-type]


def parse_user_js(text: str) -> dict[str, object]:
    """Every non-comment line must be one well-formed user_pref call (optionally followed by
    a ``// why`` comment); names must be unique."""
    prefs: dict[str, object] = {}
    for line in text.splitlines():
        if not line or line.startswith("//"):
            continue
        match = _PREF.fullmatch(line)
        assert match, f"not a pref line: {line!r}"
        name, value = json.loads(match[1]), json.loads(match[2])
        assert name not in prefs, f"{name} set twice"
        assert isinstance(value, str | int | bool)
        prefs[name] = value
    return prefs


def test_user_js_creates_the_account_identity_and_smtp_server() -> None:
    prefs = parse_user_js(render_user_js(settings()))

    account = str(prefs["mail.accountmanager.defaultaccount"])
    assert str(prefs["mail.accountmanager.accounts"]).split(",")[0] == account
    server = prefs[f"mail.account.{account}.server"]
    identity = prefs[f"mail.account.{account}.identities"]
    assert prefs[f"mail.server.{server}.type"] == "imap"
    assert prefs[f"mail.server.{server}.hostname"] == "127.0.0.1"
    assert prefs[f"mail.server.{server}.port"] == 1143
    assert prefs[f"mail.server.{server}.userName"] == "alice"
    assert prefs[f"mail.server.{server}.socketType"] == 2  # STARTTLS
    assert prefs[f"mail.server.{server}.authMethod"] == 3  # normal password
    assert prefs[f"mail.identity.{identity}.useremail"] == str(ALICE)
    assert prefs[f"mail.identity.{identity}.fullName"] == "Alice Liddell"
    assert prefs[f"mail.identity.{identity}.fcc_folder"] == "imap://alice@127.0.0.1/Sent"
    assert prefs[f"mail.identity.{identity}.draft_folder"] == "imap://alice@127.0.0.1/Drafts"

    smtp = prefs[f"mail.identity.{identity}.smtpServer"]
    assert prefs["mail.smtpservers"] == smtp
    assert prefs["mail.smtp.defaultserver"] == smtp
    assert prefs[f"mail.smtpserver.{smtp}.type"] == "smtp"
    assert prefs[f"mail.smtpserver.{smtp}.hostname"] == "127.0.0.1"
    assert prefs[f"mail.smtpserver.{smtp}.port"] == 1587
    assert prefs[f"mail.smtpserver.{smtp}.username"] == "alice"
    assert prefs[f"mail.smtpserver.{smtp}.try_ssl"] == 2
    assert prefs[f"mail.smtpserver.{smtp}.authMethod"] == 3

    local = prefs["mail.accountmanager.localfoldersserver"]
    assert prefs[f"mail.server.{local}.type"] == "none"
    assert str(prefs["mail.accountmanager.accounts"]).split(",")[1] in {
        k.split(".")[2] for k in prefs if k.endswith(".server") and prefs[k] == local
    }


def test_user_js_keeps_account_setup_off_the_internet() -> None:
    prefs = parse_user_js(render_user_js(settings(autoconfig_port=18088)))
    assert prefs["mailnews.auto_config_url"] == "http://127.0.0.1:18088/v1.1/{{domain}}.xml"
    for switch in (
        "mailnews.auto_config.fetchFromISP.enabled",
        "mailnews.auto_config.fetchFromISP.sendEmailAddress",
        "mailnews.auto_config.fetchFromExchange.enabled",
        "mailnews.auto_config.guess.enabled",
        "mailnews.headers.sendUserAgent",
    ):
        assert prefs[switch] is False
    assert prefs["mail.sanitize_date_header"] is True
    assert prefs["mailnews.auto_config.addons_url"] == ""
    assert not any("live.thunderbird.net" in str(v) for v in prefs.values())


def test_user_js_escapes_unusual_local_parts_and_names() -> None:
    odd = Address.for_key("o'brien+news", ONION_KEY)
    prefs = parse_user_js(render_user_js(settings(odd, full_name='Zoë "Z" \\ O\'Brien')))
    identity = next(k for k in prefs if k.endswith(".useremail"))
    assert prefs[identity] == str(odd)
    assert 'Zoë "Z" \\ O\'Brien' in prefs.values()
    # Thunderbird builds folder URIs with encodeURIComponent, which keeps ' but not +.
    assert "imap://o'brien%2Bnews@127.0.0.1/Sent" in prefs.values()
    # Keys must not contain the pref separator or anything outside [a-z0-9_].
    assert all(
        re.fullmatch(r"[a-z0-9_]+", k.split(".")[2]) for k in prefs if k.startswith("mail.account.")
    )


def test_two_users_get_distinct_keys() -> None:
    a = parse_user_js(render_user_js(settings()))
    b = parse_user_js(render_user_js(settings(Address.for_key("a.lice", ONION_KEY))))
    assert a["mail.accountmanager.defaultaccount"] != b["mail.accountmanager.defaultaccount"]
    assert a["mail.smtpservers"] != b["mail.smtpservers"]


def test_policies_install_the_local_ca() -> None:
    policies = json.loads(render_policies(CA))["policies"]
    assert policies["Certificates"] == {"Install": [str(CA)]}


def test_policies_switch_mozilla_services_off() -> None:
    policies = json.loads(render_policies(CA))["policies"]
    assert policies["DisableTelemetry"] is True
    assert policies["DisableAppUpdate"] is True
    assert policies["DisableSystemAddonUpdate"] is True
    assert policies["ExtensionUpdate"] is False
    assert policies["CaptivePortal"] is False
    assert policies["NetworkPrediction"] is False
    assert policies["DNSOverHTTPS"] == {"Enabled": False, "Locked": True}
    assert policies["InAppNotification"]["Disabled"] is True
    # Thunderbird's Preferences policy ignores these prefixes (Policies.sys.mjs)
    for name, setting in policies["Preferences"].items():
        assert not name.startswith(("security.", "toolkit.", "datareporting.")), name
        assert setting["Status"] == "locked"


def test_user_js_switches_mozilla_services_off() -> None:
    text = render_user_js(settings())
    prefs = parse_user_js(text)
    expected: dict[str, object] = {
        "datareporting.policy.dataSubmissionEnabled": False,
        "datareporting.healthreport.uploadEnabled": False,
        "toolkit.telemetry.enabled": False,
        "app.update.auto": False,
        "extensions.update.enabled": False,
        "extensions.systemAddon.update.enabled": False,
        "extensions.getAddons.cache.enabled": False,
        "media.gmp-provider.enabled": False,
        "browser.safebrowsing.malware.enabled": False,
        "browser.safebrowsing.phishing.enabled": False,
        "geo.enabled": False,
        "browser.region.network.url": "",
        "network.trr.mode": 5,
        "network.dns.disablePrefetch": True,
        "network.captive-portal-service.enabled": False,
        "network.connectivity-service.enabled": False,
        "security.OCSP.enabled": 0,
        "mail.inappnotifications.enabled": False,
        "mailnews.message_display.disable_remote_image": True,
        "mailnews.start_page.enabled": False,
        # the safety net: a dead-end SOCKS proxy on loopback, names resolved by it, no bypass
        "network.proxy.type": 1,
        "network.proxy.socks": "127.0.0.1",
        "network.proxy.socks_port": 9,
        "network.proxy.socks5_remote_dns": True,
        "network.proxy.allow_bypass": False,
        "network.proxy.allow_hijacking_localhost": False,
    }
    assert {name: prefs.get(name) for name in expected} == expected
    # every privacy pref says why
    privacy = text[text.index("// Thunderbird's own connections") :]
    for line in privacy.splitlines():
        if line.startswith("user_pref("):
            match = _PREF.fullmatch(line)
            assert match and match[3], f"no reason given: {line}"
    # nothing in the file points at a Mozilla or Google server
    assert not any(re.search(r"mozilla|thunderbird\.net|google", str(v)) for v in prefs.values())


def test_policies_need_an_absolute_path() -> None:
    with pytest.raises(UsageError, match="absolute"):
        render_policies(PurePosixPath("tls/ca.pem"))


def test_autoconfig_xml_has_thunderbirds_shape_and_our_values() -> None:
    domain = ALICE.domain
    root = ET.fromstring(render_autoconfig_xml([domain], imap_port=1143, smtp_port=1587))
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == domain
    assert [d.text for d in provider.findall("domain")] == [domain]
    expected = {"incomingServer": ("imap", "1143"), "outgoingServer": ("smtp", "1587")}
    for tag, (kind, port) in expected.items():
        server = provider.find(tag)
        assert server is not None and server.get("type") == kind
        values = {child.tag: child.text for child in server}
        assert values == {
            "hostname": "127.0.0.1",
            "port": port,
            "socketType": "STARTTLS",
            "username": "%EMAILLOCALPART%",
            "authentication": "password-cleartext",
        }


def test_autoconfig_xml_lists_every_domain() -> None:
    other = Address.for_key("x", ed25519_public(SeededRandom(b"other")(32))).domain
    xml = render_autoconfig_xml([ALICE.domain, other], imap_port=1, smtp_port=2)
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?>\n')
    provider = ET.fromstring(xml).find("emailProvider")
    assert provider is not None
    assert [d.text for d in provider.findall("domain")] == [ALICE.domain, other]


@pytest.mark.parametrize("require_tls", [False, True])
def test_settings_text_has_every_value(require_tls: bool) -> None:
    text = render_settings(settings(require_tls=require_tls, imap_port=11143, smtp_port=11587))
    assert str(ALICE) in text
    assert "Server:              127.0.0.1" in text
    assert "Port:                11143" in text and "Port:                11587" in text
    assert text.count("Connection security: STARTTLS") == 2
    assert text.count("Authentication:      Normal password") == 2
    assert text.count("User name:           alice ") == 2
    assert str(CA) in text
    assert ("requires STARTTLS" in text) is require_tls
    assert "http://127.0.0.1:8088/v1.1/{{domain}}.xml" in text
    assert all(len(line) <= 100 for line in text.splitlines())
