"""Whether a mutant changes nothing but what a log call is given (its message or its fields).

Such a mutant cannot change what the program does: the services log through ``quantum_trader.logs.Log``,
whose calls never raise (``Log._emit`` catches everything) and return nothing, and no code reads a log line
back. The mutation report counts these as equivalent by this one rule instead of listing each of them in
mutation/equivalent.toml. A change is log-only when every difference between the original function and the
mutant lies inside the arguments of a call ``<...>.log.<level>(...)`` / ``<...>._log.<level>(...)`` (level:
debug, info, warning, error, exception; or ``bind``, whose fields go only into later lines), and the
arguments on either side evaluate nothing that could act (no ``await``, no assignment expression, no call
except ``str``/``len``/``repr``/``round``/``format``).

The same holds for the ``name=`` of ``asyncio.create_task(...)``: a task's name only labels it in debugging
output (its repr, asyncio's "Task exception was never retrieved" lines); nothing in the program looks a task
up by name (the services keep their tasks in variables and dicts). A change of that name, or its removal, is
counted by the same rule.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator

LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "bind"})  # bind: fields for later lines
LOGGERS = frozenset({"log", "_log"})
PURE_CALLS = frozenset({"str", "len", "repr", "round", "format"})
REASON = (
    "only the arguments of a log call change (message or fields), or a task's name: Log's calls never raise and "
    "return nothing, nothing reads log lines back, and nothing looks a task up by its name (tools/log_only.py)"
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


def _is_task_call(node: ast.AST) -> bool:
    """``asyncio.create_task(...)`` or ``create_task(...)``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) == "create_task"


def _task_name_differences(a: ast.Call, b: ast.Call, *, inside_log: bool) -> Iterator[bool]:
    """Two create_task calls: their ``name=`` keywords may differ (inertly); everything else as usual."""
    names = [[k.value for k in call.keywords if k.arg == "name"] for call in (a, b)]
    if [ast.dump(value) for value in names[0]] != [ast.dump(value) for value in names[1]]:
        yield all(_inert(value) for value in [*names[0], *names[1]])
    yield from _differences(a.func, b.func, inside_log=inside_log)
    yield from _differences(a.args, b.args, inside_log=inside_log)
    rest = [[k for k in call.keywords if k.arg != "name"] for call in (a, b)]
    yield from _differences(rest[0], rest[1], inside_log=inside_log)


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
    if isinstance(a, ast.Call) and isinstance(b, ast.Call) and _is_task_call(a) and _is_task_call(b):
        yield from _task_name_differences(a, b, inside_log=inside_log)
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
