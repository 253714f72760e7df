"""The mutation report's one automatic rule (tools/log_only.py): a mutant counts as equivalent without a listed
reason only when nothing but a log call's arguments changed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("log_only", Path(__file__).parents[2] / "tools" / "log_only.py")
assert _SPEC is not None and _SPEC.loader is not None
log_only = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(log_only)

ORIGINAL = """
    async def step(self, plan, exc):
        self.log.warning(
            f"{plan.symbol}: order refused", code=exc.code, msg=exc.message
        )
        run.log.info("done", qty=str(plan.qty))
        log = self.log.bind(plan_id=plan.plan_id)
        task = asyncio.create_task(self.send(plan, 2), name=f"send-{plan.plan_id}")
        return await self.send(plan, exc.code + 1)
"""


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('f"{plan.symbol}: order refused"', '"XXorder refusedXX"'),
        ('f"{plan.symbol}: order refused"', "None"),
        ("code=exc.code, msg=exc.message", "code=None, msg=exc.message"),
        ("code=exc.code, msg=exc.message", "msg=exc.message"),
        ('run.log.info("done", qty=str(plan.qty))', 'run.log.info("XXdoneXX", qty=str(plan.qty))'),
        ("qty=str(plan.qty))", "qty=str(None))"),
        ("bind(plan_id=plan.plan_id)", "bind(plan_id=None)"),
        ('name=f"send-{plan.plan_id}"', 'name="XXsend-XX"'),  # a task's name
        ('name=f"send-{plan.plan_id}"', "name=None"),
        (', name=f"send-{plan.plan_id}"', ""),
    ],
)
def test_a_change_inside_a_log_calls_arguments_is_log_only(old: str, new: str) -> None:
    assert ORIGINAL.count(old) == 1
    assert log_only.only_log_arguments_differ(ORIGINAL, ORIGINAL.replace(old, new))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("exc.code + 1", "exc.code - 1"),  # the program's own work
        ("log = self.log.bind(", "log2 = self.log.bind("),  # what the bound logger is assigned to
        ("self.log.warning(", "self.log.error("),  # the level is another call, not an argument
        ('run.log.info("done", qty=str(plan.qty))', 'run.log.info("done", qty=str(plan.qty), x=self.send(plan))'),
        ('run.log.info("done", qty=str(plan.qty))\n', ""),  # a line removed is not an argument changed
        ("self.send(plan, 2)", "self.send(plan, 3)"),  # the task's work
        ('name=f"send-{plan.plan_id}"', "name=self.send(plan)"),  # a name that acts
        ("asyncio.create_task(self.send", "asyncio.ensure_future(self.send"),
    ],
)
def test_any_other_change_is_not(old: str, new: str) -> None:
    assert ORIGINAL.count(old) == 1
    assert not log_only.only_log_arguments_differ(ORIGINAL, ORIGINAL.replace(old, new))


def test_no_change_at_all_is_not_a_log_only_mutant() -> None:
    assert not log_only.only_log_arguments_differ(ORIGINAL, ORIGINAL)


def test_an_unparsable_source_is_not_log_only() -> None:
    assert not log_only.only_log_arguments_differ(ORIGINAL, ORIGINAL.replace("return await", "return await ("))


def test_a_call_on_another_receiver_is_not_a_log_call() -> None:
    source = "def f(self):\n    self.metrics.warning('a')\n"
    assert not log_only.only_log_arguments_differ(source, source.replace("'a'", "'b'"))
