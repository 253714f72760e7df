"""The import rule (docs/architecture.md): each layer imports only from itself and the layers below it.

    domain  <-  settings | clock  <-  secrets | runtime | logs | tasks | journal  <-  bus | exchange  <-  services
            <-  ops | views | system  <-  web | bench  <-  cli  <-  __main__

Modules of sibling parts in one layer (bus and exchange; ops, views and system; web and bench; ...) do not
import each other either. (The CLI sits above the dashboard and the bench because it starts them: `qt web`,
`qt bench`.) Every import counts, also those inside functions: a lazy import is still a
dependency, it only moves the failure to run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "quantum_trader"

LAYERS: list[set[str]] = [
    {"domain"},
    {"__init__", "settings", "clock"},  # __init__: the version
    {"secrets", "runtime", "logs", "tasks", "journal"},
    {"bus", "exchange"},
    {"services"},
    {"ops", "views", "system"},
    {"web", "bench"},
    {"cli"},
    {"__main__"},  # python -m quantum_trader: the CLI
]
LAYER = {part: n for n, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """The top-level part of ``quantum_trader.x.y``: "x" (the package's own __init__ is "__init__")."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__" and len(names) > 1:
        names.pop()
    return ".".join(names)


def imported(path: Path) -> set[str]:
    """Every quantum_trader module ``path`` imports, ``from quantum_trader import ops`` as quantum_trader.ops."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("quantum_trader"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantum_trader"):
            if node.module == "quantum_trader":  # a module of the package, or a name of its __init__
                found.update(
                    f"quantum_trader.{alias.name}" if _is_module(alias.name) else "quantum_trader"
                    for alias in node.names
                )
            else:
                found.add(node.module)
    return found


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = part_of(module)
        for target in sorted(imported(path)):
            other = part_of(target)
            if other == own:
                continue
            if other not in LAYER or own not in LAYER:
                found.append(f"{module} -> {target}: {other if other not in LAYER else own} has no layer")
            elif LAYER[other] > LAYER[own]:
                found.append(f"{module} -> {target}: {own} (layer {LAYER[own]}) imports upward")
            elif LAYER[other] == LAYER[own]:
                found.append(f"{module} -> {target}: {own} and {other} are siblings")
    return found


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if path.suffix == ".py" or (path / "__init__.py").exists()
    }
    assert sorted(parts - set(LAYER)) == []


def test_each_layer_imports_only_downward() -> None:
    assert violations() == []


def test_the_domain_imports_nothing_of_the_package_but_itself() -> None:
    domain = [m for m in violations() if m.startswith("quantum_trader.domain")]
    assert domain == []
    for path in (PACKAGE / "domain").rglob("*.py"):
        assert all(part_of(t) == "domain" for t in imported(path)), path


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from quantum_trader import ops\n", {"quantum_trader.ops"}),
        ("from quantum_trader import __version__, logs\n", {"quantum_trader", "quantum_trader.logs"}),
        ("import quantum_trader.cli.main\n", {"quantum_trader.cli.main"}),
        ("def f():\n    from quantum_trader.web.app import create_app\n", {"quantum_trader.web.app"}),
        ("import os\nfrom redis import Redis\n", set()),
    ],
)
def test_the_checker_sees_every_form_of_import(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported(path) == expected


def test_the_acl_users_are_the_roles_secrets_makes_passwords_for() -> None:
    from quantum_trader.bus.acl import ROLES, STORE_USERS, USERS
    from quantum_trader.secrets import ACL_ROLES

    assert ROLES == ACL_ROLES
    assert (*USERS, "admin", *STORE_USERS) == ACL_ROLES
