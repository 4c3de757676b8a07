"""The gateway's fast path for MAIL FROM / RCPT TO paths reads them exactly as aiosmtpd does.

``_Connection._getaddr`` skips aiosmtpd's RFC 5322 parser for the plain ``<local@domain>``
that mail clients send (it cost ~7 % of the event loop under load); every other form goes
to aiosmtpd.  Each path here is read both ways and must give the same (address, rest).
"""

from __future__ import annotations

import pytest

from gateway import smtp

PATHS = [
    "<alice@x.onion>",
    " <alice@x.onion> SIZE=100",
    "<alice@x.onion>SIZE=1",
    "<Alice.B@Ex-a.onion>  BODY=8BITMIME",
    "<a@x> ",
    "<a@x>\t",
    "<a@-x>",
    "<a@x.onion> <b@y>",
    "<a@x.onion> SIZE=1 (c)",
    # not plain: aiosmtpd decides
    "<a..b@x.onion>",
    "<.a@x>",
    "<a@x.>",
    "<@route:a@x>",
    '<"q q"@x>',
    "<a b@c>",
    "a@x",
    "<>",
    "<a@[1.2.3.4]>",
    "<a@b@c>",
    "<a@x.onion> (comment)",
    "<a@x.onion>(c) SIZE=1",
    "<" + "a" * 70 + "@x.onion>",
    "",
]


def _connection(local_part_limit: int) -> smtp._Connection:
    conn = object.__new__(smtp._Connection)  # only _getaddr's own attribute is needed
    conn.local_part_limit = local_part_limit
    return conn


@pytest.mark.parametrize("limit", [0, 64])
@pytest.mark.parametrize("path", PATHS)
def test_fast_path_reads_like_aiosmtpd(path: str, limit: int) -> None:
    conn = _connection(limit)
    assert conn._getaddr(path) == smtp.SMTP._getaddr(conn, path)
