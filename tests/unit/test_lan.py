"""LAN access: the setting, editing it in place, and enumerating this machine's names."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.lan import (
    _fib_trie_addresses,
    _if_inet6_addresses,
    connect_host,
    dovecot_listen,
    listen_hosts,
    tls_names,
)
from gateway.tls import nameable
from onionpost.base.config import GatewayConfig, load, set_setting
from onionpost.core.errors import ConfigError

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.168.1.0/24 2 0 2
        |-- 192.168.1.0
           /24 link UNICAST
        |-- 192.168.1.20
           /32 host LOCAL
        |-- 192.168.1.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 192.168.1.20
           /32 host LOCAL
"""

IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 02 40 00 80     eth0
fe8000000000000000fc00fffe000001 02 40 20 80     eth0
"""


def test_lan_is_off_by_default_and_validated(tmp_path: Path) -> None:
    assert load(tmp_path).gateway.lan is False
    (tmp_path / "onionpost.toml").write_text('[gateway]\nlan = "yes"\n')
    with pytest.raises(ConfigError, match=r"gateway\.lan must be true or false"):
        load(tmp_path)
    (tmp_path / "onionpost.toml").write_text('[gateway]\nlan = true\nlisten_host = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="listen_host"), pytest.warns(UserWarning):
        load(tmp_path)


def test_set_setting_keeps_everything_else(tmp_path: Path) -> None:
    text = (
        '# my notes\nrole = "both"\n\n[gateway]\n# lan = false   # a comment\n'
        'smtp_port = 2587\n\n[tor]\nmode = "off"\n'
    )
    cfg_file = tmp_path / "onionpost.toml"
    cfg_file.write_text(text)
    set_setting(tmp_path, "gateway", "lan", True)
    after = cfg_file.read_text()
    assert after.startswith('# my notes\nrole = "both"\n')
    assert "# lan = false   # a comment" in after and "smtp_port = 2587" in after
    cfg = load(tmp_path)
    assert cfg.gateway.lan is True and cfg.gateway.smtp_port == 2587 and cfg.tor.mode == "off"
    set_setting(tmp_path, "gateway", "lan", False)
    assert load(tmp_path).gateway.lan is False
    assert cfg_file.read_text().count("lan = ") == 2  # the comment and the one setting
    assert cfg_file.stat().st_mode & 0o777 == 0o600


def test_set_setting_creates_the_section_or_the_file(tmp_path: Path) -> None:
    set_setting(tmp_path, "gateway", "lan", True)
    assert load(tmp_path).gateway.lan is True
    other = tmp_path / "other"
    other.mkdir()
    (other / "onionpost.toml").write_text('[tor]\nmode = "off"\n')
    set_setting(other, "gateway", "lan", True)
    assert load(other).gateway.lan is True and load(other).tor.mode == "off"


def test_set_setting_refuses_what_the_node_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "onionpost.toml").write_text('[gateway]\nlisten_host = "0.0.0.0"\n')
    before = (tmp_path / "onionpost.toml").read_text()
    with pytest.raises(ConfigError), pytest.warns(UserWarning):
        set_setting(tmp_path, "gateway", "lan", True)
    assert (tmp_path / "onionpost.toml").read_text() == before


def test_listen_hosts() -> None:
    assert listen_hosts(GatewayConfig()) == ["127.0.0.1"]
    hosts = listen_hosts(GatewayConfig(lan=True))
    assert hosts[0] == "0.0.0.0" and set(hosts) <= {"0.0.0.0", "::"}
    assert dovecot_listen(GatewayConfig(lan=True)) == ", ".join(hosts)
    assert connect_host("0.0.0.0, ::") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("127.0.0.1") == "127.0.0.1"


def test_addresses_from_proc() -> None:
    assert _fib_trie_addresses(FIB_TRIE) == [
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv4Address("192.168.1.20"),
    ]
    assert [str(a) for a in _if_inet6_addresses(IF_INET6)] == [
        "::1",
        "fd00::2",
        "fe80::fc:ff:fe00:1",
    ]


def test_tls_names() -> None:
    found = [ipaddress.ip_address(a) for a in ("192.168.1.20", "fd00::2", "2a01:4f8::1")]
    names = tls_names(hostname="pi", fqdn="pi.fritz.box", addresses=found)
    assert names.dns == ("pi", "pi.local", "pi.fritz.box")
    assert [str(a) for a in names.ips] == ["192.168.1.20", "fd00::2"]
    assert [str(a) for a in names.unnamed] == ["2a01:4f8::1"]  # a global address
    # A machine whose FQDN is only localhost names nothing twice and no localhost.
    assert tls_names(hostname="vm", fqdn="localhost", addresses=[]).dns == ("vm", "vm.local")


def test_the_current_machine_has_sane_names() -> None:
    names = tls_names()
    assert all(not a.is_loopback and not a.is_link_local for a in names.ips)
    assert all(nameable(a) for a in names.ips)


def test_doctor_warns_when_the_lan_certificate_is_behind(tmp_path: Path) -> None:
    from gateway.tls import ensure_lan_tls
    from onionpost.app.doctor import _lan
    from onionpost.base.config import Config

    off = _lan(Config(tmp_path))
    assert off.ok and "off" in off.detail
    config = Config(tmp_path, gateway=GatewayConfig(lan=True))
    names = tls_names()
    if not names.dns and not names.ips:
        pytest.skip("this machine has no LAN names")
    missing = _lan(config)
    assert not missing.ok and "restart the node" in missing.fix
    ensure_lan_tls(tmp_path / "tls", names.dns, names.ips)
    assert _lan(config).ok
    # A LAN CA made for another host name: a new one is needed, and the fix says so.
    ensure_lan_tls(tmp_path / "tls", ["elsewhere"], [])
    wrong = _lan(config)
    if names.dns:
        assert not wrong.ok and "import again" in wrong.fix


def test_lan_command_turns_it_on_and_off(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onionpost.app.cli import cli

    (tmp_path / "onionpost.toml").write_text("[gateway]\nsmtp_port = 2587\n")
    runner = CliRunner()
    done = runner.invoke(cli, ["--data-dir", str(tmp_path), "lan"])
    assert done.exit_code == 0 and "LAN access: off" in done.output
    done = runner.invoke(cli, ["--data-dir", str(tmp_path), "lan", "on"])
    assert done.exit_code == 0, done.output
    assert "LAN access: ON" in done.output and "lan-ca.pem" in done.output
    assert "SMTP 0.0.0.0" in done.output and ":2587" in done.output
    assert "node starts" in done.output
    assert load(tmp_path).gateway.lan is True and load(tmp_path).gateway.smtp_port == 2587
    done = runner.invoke(cli, ["--data-dir", str(tmp_path), "lan", "off"])
    assert done.exit_code == 0 and "LAN access: off" in done.output
    assert load(tmp_path).gateway.lan is False
