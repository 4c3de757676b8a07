"""The loopback autoconfig endpoint: Thunderbird's config-v1.1.xml, for local clients only."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import pytest

from gateway.autoconfig import AutoconfigServer, start_autoconfig
from onionpost.base.config import GatewayConfig
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public

ALICE = Address.for_key("alice", ed25519_public(SeededRandom(b"autoconfig")(32)))
OTHER = Address.for_key("x", ed25519_public(SeededRandom(b"autoconfig-2")(32)))


@pytest.fixture
async def server() -> AsyncIterator[AutoconfigServer]:
    domains = [ALICE.domain.upper(), OTHER.onion]  # as stored: any case, with or without .onion
    srv = await start_autoconfig(
        GatewayConfig(autoconfig_port=0), lambda: domains, imap_port=11143, smtp_port=11587
    )
    yield srv
    await srv.close()


async def get(
    srv: AutoconfigServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    head = {"Host": f"127.0.0.1:{srv.port}", "Connection": "close", **(headers or {})}
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    writer.write(request.encode() + b"\r\n")
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    header_block, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode().split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), fields, body


def servers(body: bytes) -> dict[str, dict[str, str | None]]:
    provider = ET.fromstring(body).find("emailProvider")
    assert provider is not None
    return {s.tag: {c.tag: c.text for c in s} for s in provider if s.tag.endswith("Server")}


@pytest.mark.parametrize("suffix", [".xml", ""])
async def test_by_domain_as_thunderbird_asks(server: AutoconfigServer, suffix: str) -> None:
    status, headers, body = await get(server, f"/v1.1/{ALICE.domain}{suffix}")
    assert status == 200
    assert headers["content-type"] == "application/xml; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert servers(body) == {
        "incomingServer": {
            "hostname": "127.0.0.1",
            "port": "11143",
            "socketType": "STARTTLS",
            "username": "%EMAILLOCALPART%",
            "authentication": "password-cleartext",
        },
        "outgoingServer": {
            "hostname": "127.0.0.1",
            "port": "11587",
            "socketType": "STARTTLS",
            "username": "%EMAILLOCALPART%",
            "authentication": "password-cleartext",
        },
    }
    provider = ET.fromstring(body).find("emailProvider")
    assert provider is not None
    assert [d.text for d in provider.findall("domain")] == [ALICE.domain]


async def test_the_url_for_the_pref(server: AutoconfigServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}/v1.1/{{{{domain}}}}.xml"
    path = server.url.split(str(server.port), 1)[1].replace("{{domain}}", ALICE.domain)
    assert (await get(server, path))[0] == 200


async def test_isp_paths(server: AutoconfigServer) -> None:
    for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
        status, _, body = await get(server, f"{path}?emailaddress={ALICE}")
        assert status == 200
        provider = ET.fromstring(body).find("emailProvider")
        assert provider is not None
        assert [d.text for d in provider.findall("domain")] == [ALICE.domain]
    status, _, body = await get(server, "/mail/config-v1.1.xml")
    assert status == 200
    provider = ET.fromstring(body).find("emailProvider")
    assert provider is not None
    assert [d.text for d in provider.findall("domain")] == [ALICE.domain, OTHER.domain]


async def test_unknown_domains_are_not_served(server: AutoconfigServer) -> None:
    status, headers, _ = await get(server, "/v1.1/example.com.xml")
    assert status == 404
    assert headers["x-content-type-options"] == "nosniff"
    assert (await get(server, "/mail/config-v1.1.xml?emailaddress=a@example.com"))[0] == 404
    assert (await get(server, "/somewhere-else"))[0] == 404


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "attacker.example:8088"},  # DNS rebinding: the page's own host name
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://attacker.example"},
    ],
)
async def test_requests_from_web_pages_are_refused(
    server: AutoconfigServer, headers: dict[str, str]
) -> None:
    status, _, body = await get(server, f"/v1.1/{ALICE.domain}.xml", headers)
    assert status == 403
    assert ALICE.onion.encode() not in body


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "localhost"},
        {"Host": "[::1]:8088"},
        {"Sec-Fetch-Site": "none"},
        {"Origin": "http://127.0.0.1:8088"},
    ],
)
async def test_local_requests_are_answered(
    server: AutoconfigServer, headers: dict[str, str]
) -> None:
    assert (await get(server, f"/v1.1/{ALICE.domain}.xml", headers))[0] == 200


async def test_new_users_appear_without_a_restart() -> None:
    domains: list[str] = []
    srv = await start_autoconfig(GatewayConfig(autoconfig_port=0), lambda: domains)
    try:
        assert (await get(srv, f"/v1.1/{ALICE.domain}.xml"))[0] == 404
        domains.append(ALICE.domain)
        status, _, body = await get(srv, f"/v1.1/{ALICE.domain}.xml")
        assert status == 200
        assert servers(body)["outgoingServer"]["port"] == "1587"  # the configured port
    finally:
        await srv.close()


async def raw(srv: AutoconfigServer, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def header_names(reply: bytes) -> set[str]:
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {line.partition(":")[0].strip().lower() for line in head}


async def test_no_answer_names_the_server_or_repeats_the_request(
    server: AutoconfigServer,
) -> None:
    host = f"Host: 127.0.0.1:{server.port}\r\nConnection: close\r\n"
    marker = b"ECHO-ME-" * 1024  # 8 KiB
    requests = [
        f"GET /v1.1/{ALICE.domain}.xml HTTP/1.1\r\n{host}\r\n".encode(),  # 200
        f"GET /v1.1/ECHO-ME.onion.xml HTTP/1.1\r\n{host}\r\n".encode(),  # 404: no such domain
        b"GET /v1.1/x.xml HTTP/1.1\r\nHost: ECHO-ME.example\r\nConnection: close\r\n\r\n",  # 403
        f"GET /ECHO-ME HTTP/1.1\r\n{host}\r\n".encode(),  # aiohttp's 404
        f"POST /v1.1/ECHO-ME.xml HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n".encode(),  # 405
        f"GET /mail/config-v1.1.xml?emailaddress=ECHO-ME@x.onion HTTP/1.1\r\n{host}\r\n".encode(),
        b"GET /" + marker + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # line too long
        b"GET /v1.1/x HTTP/1.1\r\nX-Junk\x01: " + marker + b"\r\n\r\n",  # bad header
        b"\x16\x03\x01" + marker + b"\r\n\r\n",  # not HTTP at all (a TLS hello)
    ]
    for request in requests:
        reply = await raw(server, request)
        assert reply.startswith(b"HTTP/1."), (request[:60], reply[:80])
        assert "server" not in header_names(reply), reply[:300]
        assert b"ECHO-ME" not in reply and b"echo-me" not in reply.lower(), reply[:300]
        assert b"aiohttp" not in reply.lower() and b"python" not in reply.lower(), reply[:300]
        assert len(reply) < 4096 or reply.split(b" ", 2)[1] == b"200"
