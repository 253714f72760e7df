"""Docs derived from code must not drift from it."""

from __future__ import annotations

from pathlib import Path

from quantum_trader.domain import reasons

ROOT = Path(__file__).resolve().parents[2]


def test_deny_reasons_doc_is_generated_from_the_registry() -> None:
    doc = (ROOT / "docs" / "deny-reasons.md").read_text(encoding="utf-8")
    assert doc == reasons.markdown(), "docs/deny-reasons.md is stale: run `make docs`"


def test_every_module_docs_architecture_names_exists() -> None:
    """The map matches the house: each `path.py` or `folder/` the architecture page names is in the package."""
    import re

    root = Path(__file__).resolve().parents[2]
    package = root / "src" / "quantum_trader"
    text = (root / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+(?:\.py|/))", text))
    assert len(named) > 30  # the table and the lists are read, not an empty page
    files = {str(path.relative_to(package)) + ("/" if path.is_dir() else "") for path in package.rglob("*")}
    files |= {str(path.relative_to(root)) + ("/" if path.is_dir() else "") for path in (root / "tests").rglob("*")}
    files |= {str(path.relative_to(root)) for path in (root / "tools").glob("*.py")}
    files |= {path.name + "/" for path in root.iterdir() if path.is_dir()}
    # a bare name ("accounts.py") is one of the folder the sentence is about; a path must match from its start
    missing = sorted(n for n in named if not any(f == n or f.endswith("/" + n) for f in files))
    assert missing == []
