"""The error tree (onionpost/core/errors.py): the docstring's drawing is the real hierarchy, and the
classes keep the promises their names make."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

import pytest

import gateway
import onionpost
from onionpost.core import errors
from onionpost.core.errors import OnionpostError, PermanentDeliveryError, TemporaryDeliveryError


@functools.cache
def _all_error_classes() -> dict[str, type[OnionpostError]]:
    """Every OnionpostError subclass in onionpost and gateway, by name (names are unique)."""
    for package in (onionpost, gateway):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    found: dict[str, type[OnionpostError]] = {"OnionpostError": OnionpostError}
    todo = [OnionpostError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(("onionpost.", "gateway.")):
                assert sub.__name__ not in found, f"two error classes named {sub.__name__}"
                found[sub.__name__] = sub
                todo.append(sub)
    return found


def _drawn_tree() -> dict[str, str | None]:
    """{class name: parent name} as drawn in the module docstring."""
    doc = errors.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in block.splitlines():
        body = line[4:]
        if body[:1].isalpha():
            depth, name = 0, body.split()[0]
        else:
            at = body.index("+- ")
            depth = (at - 1) // 4 + 1
            name = body[at + 3 :].split()[0]
        assert re.fullmatch(r"[A-Z]\w+", name), line
        assert name not in parents, f"{name} is drawn twice"
        del stack[depth:]
        parents[name] = stack[-1] if stack else None
        stack.append(name)
    return parents


def test_the_docstring_tree_is_the_class_hierarchy() -> None:
    real = {
        name: (None if cls is OnionpostError else cls.__bases__[0].__name__)
        for name, cls in _all_error_classes().items()
    }
    drawn = _drawn_tree()
    assert sorted(set(real) - set(drawn)) == [], "classes missing from the errors.py docstring"
    assert sorted(set(drawn) - set(real)) == [], "classes drawn that do not exist"
    wrong = {n: (drawn[n], real[n]) for n in real if drawn[n] != real[n]}
    assert wrong == {}, "drawn parent vs real parent"


def test_every_error_has_a_single_onionpost_parent_and_a_sentence() -> None:
    for name, cls in _all_error_classes().items():
        if cls is OnionpostError:
            continue
        bases = [b for b in cls.__bases__ if issubclass(b, OnionpostError)]
        assert len(bases) == 1, name  # so the tree can be drawn
        assert cls.__doc__ and cls.summary().endswith((".", ")")), name
        assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", cls.enhanced_code), name


@pytest.mark.parametrize(
    ("family", "temporary"), [(TemporaryDeliveryError, True), (PermanentDeliveryError, False)]
)
def test_delivery_families_keep_the_promise_of_their_name(
    family: type[OnionpostError], temporary: bool
) -> None:
    members = [c for c in _all_error_classes().values() if issubclass(c, family)]
    assert family in members
    assert [c.__name__ for c in members if c.temporary is not temporary] == []


def test_unused_error_classes_are_removed() -> None:
    """A class nobody raises or catches is a promise the code does not keep."""
    import pathlib

    root = pathlib.Path(onionpost.__file__).parent.parent
    sources = [
        p.read_text("utf-8")
        for d in ("onionpost", "gateway")
        for p in (root / d).rglob("*.py")
        if p.name != "errors.py"
    ]
    unused = [
        name
        for name in _all_error_classes()
        if name != "OnionpostError"
        and not any(re.search(rf"(?<!class )\b{name}\b", s) for s in sources)
        and not any(
            issubclass(c, _all_error_classes()[name]) and c.__name__ != name
            for c in _all_error_classes().values()
        )
    ]
    assert unused == []
