"""Whether a mutant changes nothing but what a log call is given (its message or its fields).

Such a mutant cannot change what the program does: the services log through ``quantum_trader.logs.Log``,
whose calls never raise (``Log._emit`` catches everything) and return nothing, and no code reads a log line
back. The mutation report counts these as equivalent by this one rule instead of listing each of them in
mutation/equivalent.toml. A change is log-only when every difference between the original function and the
mutant lies inside the arguments of a call ``<...>.log.<level>(...)`` / ``<...>._log.<level>(...)`` (level:
debug, info, warning, error, exception; or ``bind``, whose fields go only into later lines), and the
arguments on either side evaluate nothing that could act (no ``await``, no assignment expression, no call
except ``str``/``len``/``repr``/``round``/``format``).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator

LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "bind"})  # bind: fields for later lines
LOGGERS = frozenset({"log", "_log"})
PURE_CALLS = frozenset({"str", "len", "repr", "round", "format"})
REASON = (
    "only the arguments of a log call change (message or fields): Log's calls never raise and return nothing, "
    "and nothing reads log lines back (tools/log_only.py)"
)


def only_log_arguments_differ(original: str, mutant: str) -> bool:
    """True when the two sources of one function differ, and only inside arguments of log calls."""
    try:
        old = ast.parse(textwrap.dedent(original))
        new = ast.parse(textwrap.dedent(mutant))
    except SyntaxError:
        return False
    places = list(_differences(old, new, inside_log=False))
    return bool(places) and all(places)


def _is_log_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or node.func.attr not in LEVELS:
        return False
    receiver = node.func.value
    name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
    return name in LOGGERS and all(_inert(arg) for arg in [*node.args, *(k.value for k in node.keywords)])


def _inert(node: ast.AST) -> bool:
    """Evaluating ``node`` cannot act: no await, no walrus, only calls of a few pure builtins."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Await | ast.NamedExpr | ast.Yield | ast.YieldFrom):
            return False
        if isinstance(sub, ast.Call) and not (isinstance(sub.func, ast.Name) and sub.func.id in PURE_CALLS):
            return False
    return True


def _differences(a: object, b: object, *, inside_log: bool) -> Iterator[bool]:
    """For each place where ``a`` and ``b`` differ: whether it lies inside a log call's arguments."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield inside_log
            return
        for x, y in zip(a, b, strict=True):
            yield from _differences(x, y, inside_log=inside_log)
        return
    if not (isinstance(a, ast.AST) and isinstance(b, ast.AST)):
        if a != b:
            yield inside_log
        return
    if type(a) is not type(b):
        yield inside_log
        return
    log_call = _is_log_call(a) and _is_log_call(b)
    for field in a._fields:
        if field in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
            continue
        arguments = log_call and field in ("args", "keywords")
        if log_call and field == "func":  # the call itself must stay the same call
            yield from _differences(getattr(a, field), getattr(b, field), inside_log=inside_log)
            continue
        yield from _differences(getattr(a, field, None), getattr(b, field, None), inside_log=inside_log or arguments)
