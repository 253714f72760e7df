"""Which `except` branches of the source never ran in any test.

Run the suite under coverage first (`make except-coverage` does both): every Python process the suite starts
(services, simulator, `qt` commands) measures itself (`patch = subprocess` in pyproject's coverage section),
so a branch counts as exercised when any test made it run in any process. A handler counts as run when the
first line of its body ran. Exit 1 when a handler outside the allow-list never ran.

    python tools/except_coverage.py [--data .coverage-data/coverage] [--all]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "quantum_trader"
# The simulator is the tests' exchange and the benchmark is a measuring tool: their handlers are listed but do
# not fail the check.
INFORMATIONAL = ("exchange/sim/", "bench/")
# "path function caught  reason" for handlers no test can reach (by function, not line: lines move)
ALLOWED = ROOT / "tools" / "except_allowed.txt"


def handlers(path: Path) -> list[tuple[int, int, str, str]]:
    """(line of the `except`, first line of its body, what it catches, the function it is in) for every
    handler in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{where}.{child.name}" if where else child.name
            if isinstance(child, ast.ExceptHandler):
                caught = ast.unparse(child.type) if child.type is not None else "everything"
                found.append((child.lineno, child.body[0].lineno, caught, where or "<module>"))
            visit(child, inner)

    visit(tree, "")
    return sorted(found)


def allowed() -> dict[tuple[str, str, str], str]:
    if not ALLOWED.exists():
        return {}
    entries = {}
    for line in ALLOWED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            where, function, rest = line.split(maxsplit=2)
            caught, _, reason = rest.partition("  ")
            entries[(where, function, caught.strip())] = reason.strip()
    return entries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / ".coverage-data" / "coverage"))
    parser.add_argument("--all", action="store_true", help="also list the simulator's and the bench's handlers")
    args = parser.parse_args()
    cov = coverage.Coverage(data_file=args.data)
    cov.combine(keep=True)
    data = cov.get_data()
    ran: dict[str, set[int]] = {}
    for measured in data.measured_files():
        ran[str(Path(measured).resolve())] = set(data.lines(measured) or ())
    skip = allowed()
    total = unrun = 0
    failing: list[str] = []
    for path in sorted(SOURCE.rglob("*.py")):
        rel = path.relative_to(SOURCE).as_posix()
        informational = rel.startswith(INFORMATIONAL)
        lines = ran.get(str(path.resolve()), set())
        for line, body, caught, function in handlers(path):
            total += 1
            if body in lines:
                continue
            unrun += 1
            where = f"{rel}:{line}"
            if (rel, function, caught) in skip:
                note = f"allowed: {skip[(rel, function, caught)]}"
            elif informational:
                note = "informational"
            else:
                note = "NEVER RAN"
                failing.append(where)
            if note == "NEVER RAN" or args.all:
                print(f"{where:<30} {function:<36} except {caught:<44} {note}")
    print(f"\n{total} except handlers, {total - unrun} ran in some test, {unrun} never ran, {len(failing)} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
