"""Hand-listed mutants of the Lua scripts in bus/scripts.py (Python mutation tools see them as opaque strings).

Each mutant is a textual replacement in one script constant: drop a guard line, flip a comparison, drop an
XACK, an EXPIRE/EX/PX, an NX. The checked-in file is never touched: each mutant runs in its own pytest process
with this module loaded as a plugin (``-p lua_mutants``, ``QT_LUA_MUTANT=<id>``); the plugin replaces the
script string in quantum_trader.bus.scripts before any test module is imported, and the Scripts class reads
the module constant when it registers the script, so every script the tests run is the mutant.

A mutant whose ``old`` text is not exactly once in its script is an error (the script changed: update this
list), not a survivor. Killed: pytest failed (exit 1). Survived: it passed (exit 0). Anything else (usage
error, no tests, crash) is reported as an error, and a run past ``per_mutant_s`` as a timeout.

The tests: tests/integration/test_scripts.py plus the few integration tests that drive one script through
the services (``extra``), on the embedded Valkey only (``-k valkey``): the scripts are the same Lua on both
stores, and the time bound matters more than the second store here. ``LUA_TESTS`` (comma-separated) replaces
the selection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = "QT_LUA_MUTANT"
BASE_TESTS = ["tests/integration/test_scripts.py"]


@dataclass(frozen=True)
class LuaMutant:
    id: str
    script: str  # the constant's name in quantum_trader.bus.scripts
    old: str
    new: str
    why: str  # what the mutant breaks, in one line
    extra: tuple[str, ...] = ()  # further tests that drive this script


def drop(id_: str, script: str, line: str, why: str, extra: tuple[str, ...] = ()) -> LuaMutant:
    return LuaMutant(id_, script, line + "\n", "", why, extra)


RATE = ("tests/integration/test_flow.py",)

MUTANTS: list[LuaMutant] = [
    # the instance check (both scripts carry it)
    drop(
        "consume-no-instance-check",
        "CONSUME_PERMITS",
        "if instance_changed() then return 'store_changed' end",
        "permits are consumed on a store instance that cannot vouch for the plan's records",
        ("tests/integration/test_apply_handler.py",),
    ),
    LuaMutant(
        "consume-instance-check-inverted",
        "CONSUME_PERMITS",
        "~= expected_epoch",
        "== expected_epoch",
        "the right instance is refused and another accepted",
    ),
    LuaMutant(
        "consume-instance-check-reads-identity",
        "CONSUME_PERMITS",
        "(redis.call('HGET', epoch, 'key') or '')",
        "table.concat(redis.call('HMGET', epoch, 'run_id', 'replid', 'floor', 'since'), '|')",
        "a restart that lost nothing refuses the plans vouched on the instance it continues",
    ),
    LuaMutant(
        "consume-instance-check-always-off",
        "CONSUME_PERMITS",
        "if not epoch then return false end",
        "if true then return false end",
        "the check is never made",
    ),
    drop(
        "result-no-instance-check",
        "PUBLISH_RESULT",
        "if instance_changed() then return {'store_changed', ''} end",
        "a not-executed result decided on a forgotten instance's word is published",
        ("tests/integration/test_apply_handler.py",),
    ),
    LuaMutant(
        "result-instance-check-inverted",
        "PUBLISH_RESULT",
        "~= expected_epoch",
        "== expected_epoch",
        "the right instance is refused and another accepted",
    ),
    # publish_plan
    drop(
        "plan-no-exists-guard",
        "PUBLISH_PLAN",
        "if redis.call('EXISTS', record) == 1 then return 0 end",
        "a plan is published twice",
    ),
    LuaMutant(
        "plan-exists-flip",
        "PUBLISH_PLAN",
        "EXISTS', record) == 1",
        "EXISTS', record) == 0",
        "a new plan is never published, a known one is published again",
    ),
    LuaMutant(
        "plan-hold-flip",
        "PUBLISH_PLAN",
        "if hold then",
        "if not hold then",
        "an executing plan takes no symbol hold",
    ),
    drop(
        "plan-no-busy",
        "PUBLISH_PLAN",
        "  if not held and redis.call('GET', hold) ~= plan_id then return 2 end",
        "a plan is published while another holds its symbol",
    ),
    LuaMutant(
        "plan-busy-owner-flip",
        "PUBLISH_PLAN",
        "GET', hold) ~= plan_id",
        "GET', hold) == plan_id",
        "the hold's owner is refused, another plan is let through",
    ),
    LuaMutant(
        "plan-hold-no-nx",
        "PUBLISH_PLAN",
        "plan_id, 'NX', 'PX', hold_ms",
        "plan_id, 'PX', hold_ms",
        "a plan overwrites another plan's symbol hold",
    ),
    LuaMutant(
        "plan-hold-no-px",
        "PUBLISH_PLAN",
        "plan_id, 'NX', 'PX', hold_ms",
        "plan_id, 'NX'",
        "the symbol hold never expires",
    ),
    drop(
        "plan-no-expire", "PUBLISH_PLAN", "redis.call('EXPIRE', record, record_ttl_s)", "the plan record never expires"
    ),
    # consume_permits
    drop(
        "consume-no-executed-guard",
        "CONSUME_PERMITS",
        "if redis.call('EXISTS', executed) == 1 then return 'already_executed' end",
        "a plan is executed twice",
    ),
    LuaMutant(
        "consume-executed-flip",
        "CONSUME_PERMITS",
        "EXISTS', executed) == 1",
        "EXISTS', executed) == 0",
        "a fresh plan is refused as executed, an executed one consumed again",
    ),
    drop(
        "consume-no-finished-guard",
        "CONSUME_PERMITS",
        "if redis.call('EXISTS', result_marker) == 1 then return 'already_finished' end",
        "a plan is executed after its result",
    ),
    drop(
        "consume-no-governor-check",
        "CONSUME_PERMITS",
        "if redis.call('GET', governor_permit) ~= governor_raw then return 'governor_permit_changed' end",
        "a swapped Governor permit is consumed",
    ),
    drop(
        "consume-no-p33-check",
        "CONSUME_PERMITS",
        "if redis.call('GET', p33_permit) ~= p33_raw then return 'p33_permit_changed' end",
        "a swapped P3.3 permit is consumed",
    ),
    drop(
        "consume-no-del",
        "CONSUME_PERMITS",
        "redis.call('DEL', governor_permit, p33_permit)",
        "the permits outlive their use",
    ),
    drop(
        "consume-no-marker",
        "CONSUME_PERMITS",
        "redis.call('SET', executed, marker, 'EX', marker_ttl_s)",
        "no executed marker: nothing stops a second execution",
    ),
    LuaMutant(
        "consume-marker-no-ex",
        "CONSUME_PERMITS",
        "marker, 'EX', marker_ttl_s)",
        "marker)",
        "the executed marker never expires",
    ),
    drop(
        "consume-no-intent",
        "CONSUME_PERMITS",
        "redis.call('ZADD', intents, now, plan_id)",
        "the order intent is not recorded",
    ),
    LuaMutant(
        "consume-audit-no-permit",
        "CONSUME_PERMITS",
        "'permit', permits[issuer]",
        "'permit', ''",
        "the consumed audit line does not carry the permit's bytes",
    ),
    # publish_result
    LuaMutant(
        "result-no-exists-guard",
        "PUBLISH_RESULT",
        "if redis.call('EXISTS', result_marker) == 1 then",
        "if false then",
        "a plan gets a second result",
    ),
    LuaMutant(
        "result-exists-no-ack",
        "PUBLISH_RESULT",
        "  ack()\n  return {'exists', ''}",
        "  return {'exists', ''}",
        "a redelivered proposal whose plan has a result stays pending",
    ),
    drop(
        "result-no-executed-guard",
        "PUBLISH_RESULT",
        "if no_order == '1' and redis.call('EXISTS', executed) == 1 then return {'executed', ''} end",
        "a no-order result hides an order that may have been sent",
    ),
    LuaMutant(
        "result-no-order-flip",
        "PUBLISH_RESULT",
        "if no_order == '1' and",
        "if no_order == '0' and",
        "the order's own result is refused, a no-order one let through",
    ),
    LuaMutant(
        "result-marker-no-ex",
        "PUBLISH_RESULT",
        "published, 'EX', marker_ttl_s)",
        "published)",
        "the result marker never expires",
    ),
    drop(
        "result-no-free",
        "PUBLISH_RESULT",
        "if redis.call('GET', hold) == plan_id then redis.call('DEL', hold) end",
        "the symbol stays held after the result",
    ),
    LuaMutant(
        "result-free-flip",
        "PUBLISH_RESULT",
        "GET', hold) == plan_id then",
        "GET', hold) ~= plan_id then",
        "another plan's hold is freed, this one's kept",
    ),
    LuaMutant(
        "result-no-intent-close",
        "PUBLISH_RESULT",
        "redis.call('ZREM', intents, plan_id)\nack()",
        "ack()",
        "the order intent stays open",
    ),
    LuaMutant(
        "result-no-ack",
        "PUBLISH_RESULT",
        "ack()\nreturn {'published'",
        "return {'published'",
        "the proposal stays pending after its result",
    ),
    # issue_permit
    LuaMutant(
        "permit-ack-dropped",
        "ISSUE_PERMIT",
        "  if plans then redis.call('XACK', plans, group, entry_id) end\n",
        "",
        "plan entries are never acknowledged",
    ),
    LuaMutant(
        "permit-claim-no-nx",
        "ISSUE_PERMIT",
        "claim_value, 'NX', 'EX', claim_ttl_s",
        "claim_value, 'EX', claim_ttl_s",
        "a later decision overwrites the first",
    ),
    LuaMutant(
        "permit-claim-no-owner-check",
        "ISSUE_PERMIT",
        "  if owner ~= claim_value then",
        "  if false then",
        "a losing decision writes its permit",
    ),
    LuaMutant(
        "permit-no-ex", "ISSUE_PERMIT", "permit_json, 'EX', permit_ttl_s)", "permit_json)", "permits never expire"
    ),
    LuaMutant(
        "permit-mark-unless-flip",
        "ISSUE_PERMIT",
        "EXISTS', mark_unless) == 0",
        "EXISTS', mark_unless) == 1",
        "the in-flight mark is set after the result was seen, not before",
    ),
    LuaMutant(
        "permit-mark-unless-always",
        "ISSUE_PERMIT",
        "(not mark_unless or ",
        "(",
        "a mark without an unless key tests the claim key instead",
    ),
    LuaMutant(
        "permit-mark-no-ex",
        "ISSUE_PERMIT",
        "mark_value, 'EX', mark_ttl_s)",
        "mark_value)",
        "the in-flight mark never expires",
    ),
    drop(
        "permit-no-count",
        "ISSUE_PERMIT",
        "    redis.call('ZADD', counted, count_at, count_member)",
        "a Governor allow is not counted in the rate limit",
        RATE,
    ),
    drop(
        "permit-no-trim",
        "ISSUE_PERMIT",
        "    redis.call('ZREMRANGEBYSCORE', counted, '-inf', count_window_start)",
        "old allows are never trimmed from the rate-limit window",
        RATE,
    ),
    drop(
        "permit-count-no-expire",
        "ISSUE_PERMIT",
        "    redis.call('EXPIRE', counted, count_expire_s)",
        "the rate-limit sets never expire",
        RATE,
    ),
    LuaMutant(
        "permit-no-final-ack",
        "ISSUE_PERMIT",
        "ack()\nreturn {1, claim_value}",
        "return {1, claim_value}",
        "the winning decision's plan entry stays pending",
    ),
    LuaMutant(
        "permit-loser-no-ack",
        "ISSUE_PERMIT",
        "    ack()\n    return {0",
        "    return {0",
        "a losing decision's plan entry stays pending",
    ),
    # hold_for_intent
    drop(
        "hold-no-intent-guard",
        "HOLD_FOR_INTENT",
        "if not redis.call('ZSCORE', intents, plan_id) then return 0 end",
        "the hold outlives the intent it stands for",
    ),
    LuaMutant("hold-no-px", "HOLD_FOR_INTENT", "plan_id, 'PX', left)", "plan_id)", "the hold never expires"),
    drop(
        "hold-no-record-check",
        "HOLD_FOR_INTENT",
        "if left == -2 then return 0 end",
        "a hold is taken for an intent whose plan record is gone",
    ),
    LuaMutant(
        "hold-px-not-record",
        "HOLD_FOR_INTENT",
        "'PX', left)",
        "'PX', default_ms)",
        "the hold outlives the plan record it stands for",
    ),
    drop(
        "hold-no-persist-default",
        "HOLD_FOR_INTENT",
        "if left == -1 then left = default_ms end",
        "a record without expiry gets no hold (PX -1 is refused)",
    ),
]

BY_ID = {m.id: m for m in MUTANTS}


def mutated(mutant: LuaMutant, source: str) -> str:
    count = source.count(mutant.old)
    if count != 1:
        raise ValueError(f"lua mutant {mutant.id}: its text is {count} times in {mutant.script}, not once")
    return source.replace(mutant.old, mutant.new)


# --- the pytest plugin (loaded in the mutant's own process) ------------------------------------------------


def pytest_configure(config: Any) -> None:
    mutant_id = os.environ.get(ENV)
    if not mutant_id:
        return
    from quantum_trader.bus import scripts

    mutant = BY_ID[mutant_id]
    original = getattr(scripts, mutant.script)
    setattr(scripts, mutant.script, mutated(mutant, original))
    # the check that the tests really run the mutant: the module now holds the mutated text
    if getattr(scripts, mutant.script) == original:
        raise RuntimeError(f"lua mutant {mutant_id} changed nothing")


# --- the runner --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    hit_bound: bool = False
    status: dict[str, str] = field(default_factory=dict)  # id -> killed | survived | timeout | error | not run

    def as_result(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for status in self.status.values():
            counts[status] = counts.get(status, 0) + 1
        survivors = [
            {"mutant": f"lua:{i}", "diff": f"{BY_ID[i].script}: {BY_ID[i].why}\n-{BY_ID[i].old!r}\n+{BY_ID[i].new!r}"}
            for i, s in self.status.items()
            if s == "survived"
        ]
        return {
            "files": {"src/quantum_trader/bus/scripts.py (Lua)": _columns(counts)},
            "survivors": survivors,
            "equivalent": [],
            "stale_equivalents": [],
            "errors": {i: s for i, s in self.status.items() if s == "error"},
        }


def _columns(counts: dict[str, int]) -> dict[str, int]:
    # the report's column names: an unrun mutant is "not checked", an error "other"
    renamed = {"not run": "not checked", "error": "other"}
    out: dict[str, int] = {}
    for k, v in counts.items():
        out[renamed.get(k, k)] = out.get(renamed.get(k, k), 0) + v
    return out


def run_one(mutant: LuaMutant, timeout_s: float) -> str:
    from quantum_trader.bus import scripts

    mutated(mutant, getattr(scripts, mutant.script))  # a stale entry fails here, before a pytest run
    selection = os.environ.get("LUA_TESTS")
    tests = selection.split(",") if selection else [*BASE_TESTS, *mutant.extra]
    env = {**os.environ, ENV: mutant.id, "PYTHONPATH": str(ROOT / "tools")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "lua_mutants"]
    cmd += ["-k", "valkey", *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return "timeout"
    return {1: "killed", 0: "survived"}.get(proc.returncode, "error")


def run_all(budget_s: float, per_mutant_s: float = 300.0) -> Outcome:
    deadline = time.monotonic() + budget_s
    outcome = Outcome()
    only = os.environ.get("LUA_MUTANTS")
    chosen = [m for m in MUTANTS if not only or m.id in only.split(",")]
    for mutant in chosen:
        left = deadline - time.monotonic()
        if left <= 5:
            outcome.hit_bound = True
            outcome.status[mutant.id] = "not run"
            continue
        try:
            status = run_one(mutant, min(per_mutant_s, left))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            status = "error"
        if status == "timeout" and deadline - time.monotonic() <= 5:
            status, outcome.hit_bound = "not run", True
        outcome.status[mutant.id] = status
        print(f"lua mutant {mutant.id}: {status}", flush=True)
    return outcome


if __name__ == "__main__":
    # tools/lua_mutants.py [id ...]: run these (default: all), 20 minutes at most
    if len(sys.argv) > 1:
        os.environ["LUA_MUTANTS"] = ",".join(sys.argv[1:])
    result = run_all(budget_s=float(os.environ.get("MUTATION_MINUTES", "20")) * 60)
    print(result.as_result())
