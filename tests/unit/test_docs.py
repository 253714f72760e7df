"""Docs derived from code must not drift from it."""

from __future__ import annotations

from pathlib import Path

from quantum_trader.domain import reasons

ROOT = Path(__file__).resolve().parents[2]


def test_deny_reasons_doc_is_generated_from_the_registry() -> None:
    doc = (ROOT / "docs" / "deny-reasons.md").read_text(encoding="utf-8")
    assert doc == reasons.markdown(), "docs/deny-reasons.md is stale: run `make docs`"
