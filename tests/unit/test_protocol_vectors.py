"""docs/protocol.md's test vectors are exactly what the code produces today.

A failure means the wire format changed (update the document on purpose with
``python -m tests.unit.protocol_vectors --write`` and say so in the change) or the document
was edited by hand.
"""

from __future__ import annotations

import difflib

import pytest

from tests.unit import protocol_vectors as pv


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return pv.generate()


@pytest.fixture(scope="module")
def documented() -> dict[str, str]:
    return pv.read_blocks(pv.DOC.read_text(encoding="utf-8"))


def test_every_vector_is_in_the_document(
    generated: dict[str, str], documented: dict[str, str]
) -> None:
    assert sorted(documented) == sorted(generated)


@pytest.mark.parametrize("name", sorted(pv.generate()))
def test_vector_matches(name: str, generated: dict[str, str], documented: dict[str, str]) -> None:
    if documented.get(name) != generated[name]:
        diff = "\n".join(
            difflib.unified_diff(
                (documented.get(name) or "").splitlines(),
                generated[name].splitlines(),
                "docs/protocol.md",
                "generated",
                lineterm="",
            )
        )
        pytest.fail(f"vector block '{name}' differs from the code:\n{diff}")


def test_generation_is_deterministic(generated: dict[str, str]) -> None:
    assert pv.generate() == generated


def test_write_round_trips(generated: dict[str, str]) -> None:
    text = pv.DOC.read_text(encoding="utf-8")
    rewritten = pv.write_blocks(text, generated)
    assert pv.read_blocks(rewritten) == generated
    assert pv.write_blocks(rewritten, generated) == rewritten
