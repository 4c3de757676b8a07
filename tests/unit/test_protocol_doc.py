"""docs/protocol.md names everything the code puts on the wire or binds a key to: every context
string and every node API route.  A new one without its line in the spec fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = (ROOT / "docs" / "protocol.md").read_text("utf-8")


def _context_strings() -> list[tuple[str, str]]:
    """(file, string) for every bytes literal in the code that starts with 'onionpost'."""
    found = []
    for package in ("onionpost", "gateway"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, bytes)
                    and node.value.startswith(b"onionpost")
                ):
                    # The spec writes a trailing NUL as \0.
                    text = node.value.decode("ascii").replace("\x00", "\\0")
                    found.append((str(path.relative_to(ROOT)), text))
    return found


CONTEXTS = _context_strings()


def test_the_code_has_context_strings() -> None:
    names = {text for _, text in CONTEXTS}
    assert "onionpost/v1/device-login\\0" in names and len(names) > 25


@pytest.mark.parametrize(("path", "text"), CONTEXTS)
def test_every_context_string_is_in_the_spec(path: str, text: str) -> None:
    assert f"`{text}`" in SPEC, f"{text} ({path}) is not in docs/protocol.md"


def _routes() -> list[tuple[str, str]]:
    source = (ROOT / "onionpost" / "inbox" / "api.py").read_text("utf-8")
    return re.findall(r'add_(get|post)\("(/v1/[^"]*)"', source)


ROUTES = _routes()


def test_the_server_has_routes() -> None:
    assert ("post", "/v1/deliver") in ROUTES and len(ROUTES) > 20


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_every_route_is_in_the_spec(method: str, route: str) -> None:
    assert f"`{method.upper()} {route}" in SPEC, f"{method.upper()} {route} is not in the spec"
    # and in the module's own list
    doc = (ROOT / "onionpost" / "inbox" / "api.py").read_text("utf-8").split('"""')[1]
    assert re.search(rf"{method.upper()}\s+{re.escape(route.removeprefix('/v1'))}\s", doc)
