"""Thunderbird's autoconfig file for the gateway, served over HTTP on 127.0.0.1.

Thunderbird fetches account settings from ``mailnews.auto_config_url`` (the "ISP database"
lookup); the user.js from :mod:`gateway.thunderbird` points that pref here, so the settings
come from this computer instead of live.thunderbird.net.  Paths served:

* ``/v1.1/{domain}.xml`` and ``/v1.1/{domain}``: what ``mailnews.auto_config_url`` produces,
  with or without a ``{{domain}}`` placeholder;
* ``/mail/config-v1.1.xml`` and ``/.well-known/autoconfig/mail/config-v1.1.xml``: the ISP
  autoconfig paths, for ``?emailaddress=`` or for every domain of this node.

The answer names this node's onion domains, which identify its users, so only requests that
are plainly local get one: the Host header must be a loopback name (a web page using DNS
rebinding to reach this port would send its own host name), and requests a browser marks as
coming from another site (``Sec-Fetch-Site``, ``Origin``) are refused.  ``nosniff`` keeps a
page from loading the file as a script to learn, by success or failure, whether a domain is
served.  No access log is written, since request paths carry the domains.

Like the node API, it tells a prober nothing about its software and repeats nothing it was
sent: no ``Server`` header on any answer (aiohttp's own error pages included), and a request
that is not valid HTTP gets a short fixed text instead of aiohttp's page quoting its bytes.

aiohttp is imported here and in ``onionpost/inbox/api.py`` (a contract in pyproject.toml
names both); this server is a few routes on loopback, with none of the node API's exposure,
and takes its header-less responses and fixed error pages from the API server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.thunderbird import LOOPBACK, render_autoconfig_xml
from onionpost.base.config import GatewayConfig
from onionpost.inbox.api import FixedErrorPages, QuietResponse

__all__ = ["AutoconfigServer", "start_autoconfig"]

log = logging.getLogger(__name__)

_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
_LOCAL_FETCH_SITES = frozenset({"none", "same-origin"})
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _text(status: int, text: str) -> web.Response:
    return QuietResponse(status=status, text=text, headers=_HEADERS)


class _FixedErrors(FixedErrorPages):
    """A request that is not valid HTTP gets a short fixed text, not aiohttp's page quoting
    the offending bytes."""

    __slots__ = ()
    what = "autoconfig"
    error_log = log

    @classmethod
    def page(cls, status: int) -> web.Response:
        if status >= 500:
            return _text(status, "The autoconfig server hit an internal error.\n")
        return _text(status, "The request is not valid HTTP.\n")


@web.middleware
async def _fixed_pages(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's 404 and 405 pages, as short fixed texts without a ``Server`` header."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _text(exc.status, f"{exc.status} {exc.reason}\n")


def _normalise(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    return domain if domain.endswith(".onion") else f"{domain}.onion"


def _host_only(value: str) -> str:
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_local_request(request: web.Request) -> bool:
    if _host_only(request.headers.get("Host", "")).lower() not in _LOCAL_HOSTS:
        return False
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in _LOCAL_FETCH_SITES:
        return False
    origin = request.headers.get("Origin")
    return origin is None or (urlsplit(origin).hostname or "") in _LOCAL_HOSTS


class _Routes:
    def __init__(self, domains: Callable[[], list[str]], *, imap_port: int, smtp_port: int) -> None:
        self._domains = domains
        self._imap_port = imap_port
        self._smtp_port = smtp_port

    def _answer(self, request: web.Request, wanted: list[str] | None) -> web.Response:
        if not _is_local_request(request):
            return _text(403, "Only local mail clients may ask.\n")
        served = [_normalise(d) for d in self._domains()]
        chosen = served if wanted is None else [d for d in served if d in wanted]
        if not chosen:
            return _text(404, "No such mail domain here.\n")
        xml = render_autoconfig_xml(
            chosen, imap_port=self._imap_port, smtp_port=self._smtp_port, host=LOOPBACK
        )
        return QuietResponse(
            text=xml, content_type="application/xml", charset="utf-8", headers=_HEADERS
        )

    async def by_domain(self, request: web.Request) -> web.Response:
        name = request.match_info["name"].removesuffix(".xml")
        return self._answer(request, [_normalise(name)])

    async def by_address(self, request: web.Request) -> web.Response:
        address = request.query.get("emailaddress")
        if address is None:
            return self._answer(request, None)
        return self._answer(request, [_normalise(address.rpartition("@")[2])])


class AutoconfigServer:
    """The running endpoint: where it listens, and how to stop it."""

    def __init__(
        self, runner: web.AppRunner, listener: asyncio.Server, host: str, port: int
    ) -> None:
        self._runner = runner
        self._listener = listener
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """The value for Thunderbird's ``mailnews.auto_config_url``."""
        return f"http://{self.host}:{self.port}/v1.1/{{{{domain}}}}.xml"

    async def close(self) -> None:
        self._listener.close()
        if self._runner.server is not None:
            await self._runner.server.shutdown(1.0)
        await self._runner.cleanup()


async def start_autoconfig(
    cfg: GatewayConfig,
    domains: Callable[[], list[str]],
    *,
    imap_port: int | None = None,
    smtp_port: int | None = None,
) -> AutoconfigServer:
    """Serve ``config-v1.1.xml`` on ``cfg.listen_host:cfg.autoconfig_port`` (0: any port).

    ``imap_port``/``smtp_port`` are the ports the servers really listen on, when they were
    started on port 0; ``domains`` is asked at each request, so new users appear at once.
    """
    routes = _Routes(
        domains,
        imap_port=cfg.imap_port if imap_port is None else imap_port,
        smtp_port=cfg.smtp_port if smtp_port is None else smtp_port,
    )
    app = web.Application(middlewares=[_fixed_pages])
    app.router.add_get("/v1.1/{name}", routes.by_domain)
    app.router.add_get("/mail/config-v1.1.xml", routes.by_address)
    app.router.add_get("/.well-known/autoconfig/mail/config-v1.1.xml", routes.by_address)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None

    def protocol() -> RequestHandler:
        return _FixedErrors.adopt(server())

    try:
        listener = await asyncio.get_running_loop().create_server(
            protocol, cfg.listen_host, cfg.autoconfig_port
        )
        host, port = listener.sockets[0].getsockname()[:2]
    except BaseException:
        await runner.cleanup()
        raise
    log.info("autoconfig: serving Thunderbird settings on http://%s:%d/", host, port)
    return AutoconfigServer(runner, listener, str(host), int(port))
