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
ALLOWED = ROOT / "tools" / "except_allowed.txt"  # "path:line  reason" for handlers a test cannot reach


def handlers(path: Path) -> list[tuple[int, int, str]]:
    """(line of the `except`, first line of its body, what it catches) for every handler in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            caught = ast.unparse(node.type) if node.type is not None else "everything"
            found.append((node.lineno, node.body[0].lineno, caught))
    return sorted(found)


def allowed() -> dict[str, str]:
    if not ALLOWED.exists():
        return {}
    entries = {}
    for line in ALLOWED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            where, _, reason = line.partition(" ")
            entries[where] = reason.strip()
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
        for line, body, caught in handlers(path):
            total += 1
            if body in lines:
                continue
            unrun += 1
            where = f"{rel}:{line}"
            if where in skip:
                note = f"allowed: {skip[where]}"
            elif informational:
                note = "informational"
            else:
                note = "NEVER RAN"
                failing.append(where)
            if note == "NEVER RAN" or args.all:
                print(f"{where:<42} except {caught:<50} {note}")
    print(f"\n{total} except handlers, {total - unrun} ran in some test, {unrun} never ran, {len(failing)} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
