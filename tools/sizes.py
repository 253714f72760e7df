"""Module, class and function sizes of src/quantum_trader, at the work tree or at git revisions.

    python tools/sizes.py                 # the work tree
    python tools/sizes.py f065d27 HEAD    # before/after: one column per revision

Prints the modules over MODULE_LINES lines, the classes over CLASS_LINES and the functions over FUNCTION_LINES
(the limits issue 13 sets for the order path), each with its length per revision ("-" where it does not exist
there), then a summary row per revision. Lengths are physical lines from ``def``/``class`` (decorators
excluded) to the last line of the body, as ``ast`` reports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "src/quantum_trader"
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 300, 300, 60

Sizes = dict[str, int]  # "kind name" -> lines


def sources(rev: str | None) -> Iterator[tuple[str, str]]:
    """(path, text) of every Python file under the package, in the work tree or at ``rev``."""
    if rev is None:
        for path in sorted((ROOT / PACKAGE).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()
        return
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, PACKAGE], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in sorted(n for n in names if n.endswith(".py")):
        text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout
        yield name, text.decode()


def measure(rev: str | None) -> tuple[Sizes, Sizes, Sizes]:
    modules: Sizes = {}
    classes: Sizes = {}
    functions: Sizes = {}
    for path, text in sources(rev):
        module = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
        modules[module] = len(text.splitlines())
        for node, qualname in walk(ast.parse(text), module):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            (classes if isinstance(node, ast.ClassDef) else functions)[qualname] = length
    return modules, classes, functions


def walk(tree: ast.AST, prefix: str) -> Iterator[tuple[ast.AST, str]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}.{node.name}"
            yield node, name
            yield from walk(node, name)


def table(title: str, columns: list[Sizes], labels: list[str], limit: int) -> None:
    over = sorted({name for sizes in columns for name, n in sizes.items() if n > limit})
    print(f"\n## {title} over {limit} lines\n")
    print("| name | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for name in sorted(over, key=lambda n: -max(s.get(n, 0) for s in columns)):
        cells = [str(sizes[name]) if name in sizes else "-" for sizes in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if not over:
        print("| (none) |" + " |" * len(labels))


def main(argv: list[str]) -> int:
    revs: list[str | None] = list(argv) or [None]
    labels = [rev or "work tree" for rev in revs]
    measured = [measure(rev) for rev in revs]
    table("Modules", [m for m, _, _ in measured], labels, MODULE_LINES)
    table("Classes", [c for _, c, _ in measured], labels, CLASS_LINES)
    table("Functions", [f for _, _, f in measured], labels, FUNCTION_LINES)
    print("\n## Summary\n")
    print("| revision | modules | lines | largest module | classes > 300 | functions > 60 | longest function |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (modules, classes, functions) in zip(labels, measured, strict=True):
        print(
            f"| {label} | {len(modules)} | {sum(modules.values())} | {max(modules.values())} "
            f"| {sum(n > CLASS_LINES for n in classes.values())} "
            f"| {sum(n > FUNCTION_LINES for n in functions.values())} | {max(functions.values())} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
