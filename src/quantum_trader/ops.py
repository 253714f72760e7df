"""Operator and client actions on a running chain: propose, wait for a result, grant or deny a permit, flip
the kill switch, switch the Governor's mode, ask P3.3 to reconcile. Used by the CLI, the demo and the tests.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.permit_writes import governor_permit_write
from quantum_trader.bus.scripts import Scripts
from quantum_trader.bus.streams import STREAM_MAXLEN
from quantum_trader.domain import reasons
from quantum_trader.domain.models import AuditEntry, MalformedEntry, Plan, Result, from_fields
from quantum_trader.domain.planning import client_order_id, plan_id_for
from quantum_trader.domain.story import line_identity
from quantum_trader.domain.verdict import Verdict
from quantum_trader.exchange.base import ExchangeError, OutcomeUnknown
from quantum_trader.exchange.binance import BinanceFutures
from quantum_trader.journal import Journal, open_journal, read_journal
from quantum_trader.secrets import permit_key
from quantum_trader.settings import Settings


class OperatorError(Exception):
    """The action cannot be done; the message says why (shown to the operator as one line)."""


@dataclass(frozen=True, slots=True)
class Submitted:
    entry_id: str
    proposal_id: str
    plan_id: str
    result_cursor: str  # result stream position before the proposal: where to look for its result

    @property
    def client_order_id(self) -> str:
        """The client order id its plan's order has on the exchange."""
        return client_order_id(self.proposal_id)


async def propose(
    redis: aioredis.Redis,
    symbol: str,
    action: str,
    *,
    qty: Decimal | None = None,
    close_pct: Decimal | None = None,
    kill_score: float | None = None,
    source: str = "cli",
    proposal_id: str = "",
    extra: dict[str, str] | None = None,
) -> Submitted:
    """Publish a proposal on ``quantum:stream:harvest.proposal``; returns the plan id Apply will give it."""
    proposal_id = proposal_id or uuid.uuid4().hex[:16]
    fields = {
        "proposal_id": proposal_id,
        "symbol": symbol,
        "action": action,
        "source": source,
        "created_at": repr(time.time()),
    }
    if qty is not None:
        fields["qty"] = format(qty, "f")
    if close_pct is not None:
        fields["close_pct"] = format(close_pct, "f")
    if kill_score is not None:
        fields["kill_score"] = repr(kill_score)
    fields.update(extra or {})
    cursor = await last_id(redis, keys.RESULT_STREAM)
    entry_id = await redis.xadd(keys.PROPOSAL_STREAM, fields, maxlen=STREAM_MAXLEN, approximate=True)
    return Submitted(entry_id, proposal_id, plan_id_for(proposal_id), cursor)


async def last_id(redis: aioredis.Redis, stream: str) -> str:
    last = await redis.xrevrange(stream, count=1)
    return str(last[0][0]) if last else "0-0"


async def wait_result(redis: aioredis.Redis, plan_id: str, timeout_s: float, cursor: str = "0-0") -> Result | None:
    """The plan's result, waiting up to ``timeout_s`` (blocking reads on the result stream, no polling)."""
    deadline = time.monotonic() + timeout_s
    found = await result_of(redis, plan_id)
    if found is not None:
        return found
    while (left := deadline - time.monotonic()) > 0:
        reply = await redis.xread({keys.RESULT_STREAM: cursor}, count=500, block=max(1, int(min(left, 1.0) * 1000)))
        for _, entries in reply or ():
            for entry_id, fields in entries:
                cursor = entry_id
                if fields.get("plan_id") == plan_id:
                    return from_fields(Result, fields)
    return await result_of(redis, plan_id)


async def result_of(redis: aioredis.Redis, plan_id: str) -> Result | None:
    entry_id = await redis.get(keys.result_marker(plan_id))
    if not entry_id:
        return None
    entries = await redis.xrange(keys.RESULT_STREAM, entry_id, entry_id)
    return from_fields(Result, entries[0][1]) if entries else None


async def load_plan(redis: aioredis.Redis, plan_id: str) -> Plan:
    record = await redis.hgetall(keys.plan_record(plan_id))
    if not record:
        raise OperatorError(f"no plan {plan_id} (unknown, or older than a day)")
    try:
        return from_fields(Plan, record)
    except MalformedEntry as exc:
        raise OperatorError(f"plan {plan_id} record is unreadable: {exc}") from None


async def decide_manually(
    redis: aioredis.Redis, settings: Settings, plan_id: str, *, grant: bool, reason: str, operator: str
) -> str:
    """``qt permit grant|deny``: write the Governor-slot permit as an operator. Returns what was done."""
    plan = await load_plan(redis, plan_id)
    if plan.decision != "EXECUTE":
        raise OperatorError(f"plan {plan_id} is {plan.decision} ({plan.reason}); nothing to permit")
    if await redis.exists(keys.result_marker(plan_id)):
        result = await result_of(redis, plan_id)
        outcome = "executed" if result and result.executed else (result.error if result else "done")
        raise OperatorError(f"plan {plan_id} already has its result ({outcome}); a permit would change nothing")
    if grant and await redis.get(keys.KILL_SWITCH) == "1":
        raise OperatorError("the kill switch is on: turn it off (qt governor kill-switch off) before granting")
    verdict = Verdict(grant, reason or (reasons.OPERATOR_GRANT if grant else reasons.OPERATOR_DENY))
    (written, owner), *_ = await Scripts(redis, open_journal(settings, "operator", sync_each=True)).issue_permits(
        [
            governor_permit_write(
                settings,
                permit_key(settings, "governor"),
                plan,
                verdict,
                issuer="operator",
                claim_owner=f"operator:{operator}",
                now=time.time(),
            )
        ]
    )
    if not written:
        raise OperatorError(f"plan {plan_id} was already decided for the Governor slot by {owner}")
    return f"{'granted' if grant else 'denied'} plan {plan_id} ({plan.symbol} {plan.action} {plan.qty})"


async def _ops_audit(redis: aioredis.Redis, action: str, value: str, who: str, journal: Journal | None) -> None:
    fields = {"action": action, "value": value, "who": who, "at": repr(time.time())}
    await Scripts(redis, journal).append(keys.OPS_AUDIT_STREAM, fields, keys.OPS_AUDIT_MAXLEN)


async def set_kill_switch(redis: aioredis.Redis, on: bool, who: str, journal: Journal | None = None) -> None:
    if on:
        await redis.set(keys.KILL_SWITCH, "1")
    else:
        await redis.delete(keys.KILL_SWITCH)
    await _ops_audit(redis, "kill_switch", "on" if on else "off", who, journal)


async def kill_switch_on(redis: aioredis.Redis) -> bool:
    return bool(await redis.get(keys.KILL_SWITCH) == "1")


async def set_governor_mode(redis: aioredis.Redis, mode: str, who: str, journal: Journal | None = None) -> None:
    if mode not in ("auto", "manual"):
        raise OperatorError(f"mode must be auto or manual, not {mode!r}")
    await redis.set(keys.GOVERNOR_MODE, mode)
    await _ops_audit(redis, "governor_mode", mode, who, journal)


async def request_reconcile(redis: aioredis.Redis, who: str, journal: Journal | None = None) -> None:
    await redis.set(keys.RECONCILE_REQUEST, who)
    await _ops_audit(redis, "reconcile_request", "all", who, journal)


async def plan_audit(redis: aioredis.Redis, plan_id: str, since: str = "-") -> list[AuditEntry]:
    """Audit entries of one plan (a scan of the audit stream from ``since``; fine for demos and tests)."""
    entries = await redis.xrange(keys.AUDIT_STREAM, since, "+")
    found = []
    for _, fields in entries:
        if fields.get("plan_id") == plan_id:
            try:
                found.append(from_fields(AuditEntry, fields))
            except MalformedEntry:
                continue
    return found


# --- break glass: the hour the chain fails closed -------------------------------------------------------------

BREAK_GLASS_ACTIONS = ("break_glass_close", "break_glass_result")
BREAK_GLASS_PREFIX = "qtbg-"  # never "qt-": the search for forgotten orders must not take one for a plan's order


async def break_glass_close(
    exchange: BinanceFutures, symbol: str, qty: Decimal | None, who: str, journal: Journal
) -> tuple[str, list[dict[str, str]]]:
    """Close ``qty`` (default: all) of ``symbol``'s position reduce-only, straight on the exchange, past the
    permit chain. The intent is journaled and fsynced before the order is sent (nothing is sent when it cannot
    be), the outcome after, so the trail has both whatever happens to the store or to this process. Returns
    the outcome line and the two ops-audit lines for the store (``record_break_glass``). An order whose outcome
    is unknown is never sent again: the line says so and names its client order id."""
    position = (await exchange.positions([symbol])).get(symbol)
    if position is None or position.amt == 0:
        raise OperatorError(f"{symbol}: no open position on the exchange; nothing to close")
    size = abs(position.amt)
    if qty is None:
        qty = size
    if not qty.is_finite() or qty <= 0 or qty > size:
        raise OperatorError(f"{symbol}: --qty {qty} must be above 0 and at most the position's size {size}")
    side = "SELL" if position.amt > 0 else "BUY"
    coid = f"{BREAK_GLASS_PREFIX}{uuid.uuid4().hex[:20]}"
    intent = {
        "action": "break_glass_close",
        "value": f"{symbol} {side} {qty} reduce-only, client order id {coid} (position {position.amt})",
        "who": who,
        "at": repr(time.time()),
    }
    try:
        journal.append_or_raise(keys.OPS_AUDIT_STREAM, intent)
        journal.sync()
    except OSError as exc:
        raise OperatorError(f"cannot record the close in {journal.path} ({exc}): nothing was sent") from None
    try:
        report = await exchange.place_reduce_only_market(symbol, side, qty, coid)
        outcome = (
            f"{symbol} {coid}: {report.status}, filled {report.executed_qty} @ {report.avg_price} "
            f"(order {report.order_id})"
        )
    except OutcomeUnknown as exc:
        outcome = f"{symbol} {coid}: outcome unknown ({exc.message}); look it up, do not send it again"
    except ExchangeError as exc:
        outcome = f"{symbol} {coid}: not placed ({type(exc).__name__}: {exc.message})"
    done = {"action": "break_glass_result", "value": outcome, "who": who, "at": repr(time.time())}
    if journal.append(keys.OPS_AUDIT_STREAM, done):
        with contextlib.suppress(OSError):
            journal.sync()
    else:
        outcome += f" (NOT in the journal {journal.path}: keep this line)"
    return outcome, [intent, done]


def break_glass_lines(journal_dir: Path) -> list[dict[str, str]]:
    """Every break-glass line of the journals in ``journal_dir``."""
    return [
        r.fields
        for r in read_journal(journal_dir).records
        if r.stream == keys.OPS_AUDIT_STREAM and r.fields.get("action") in BREAK_GLASS_ACTIONS
    ]


async def record_break_glass(redis: aioredis.Redis, lines: list[dict[str, str]]) -> int:
    """Add to the store's operator audit every one of ``lines`` it does not have yet (it did not answer when
    the close was made, or lost the lines since). The whole stream is compared (it is small: operators' actions),
    so no clock decides what counts as there. Returns how many were added."""
    if not lines:
        return 0
    have = {line_identity(fields) async for _, fields in _entries(redis, keys.OPS_AUDIT_STREAM)}
    added = 0
    for fields in lines:
        if line_identity(fields) not in have:
            await redis.xadd(keys.OPS_AUDIT_STREAM, fields, maxlen=keys.OPS_AUDIT_MAXLEN, approximate=True)
            have.add(line_identity(fields))
            added += 1
    return added


async def _entries(redis: aioredis.Redis, stream: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    cursor = "-"
    while True:
        chunk = await redis.xrange(stream, cursor, "+", count=1000)
        for entry in chunk:
            yield entry
        if len(chunk) < 1000:
            return
        cursor = f"({chunk[-1][0]}"
