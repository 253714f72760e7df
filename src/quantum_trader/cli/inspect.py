"""``qt acl``, ``qt status``, ``qt audit``, ``qt report``, ``qt explain``, ``qt version``: the store's users, the
chain's state, its audit trail, and what a code means."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from quantum_trader import __version__
from quantum_trader.cli.app import EXIT_USAGE, app, fail, settings_or_exit, with_store
from quantum_trader.domain.reasons import REGISTRY, explain
from quantum_trader.ops import OperatorError


@app.command("acl")
def acl_cmd(
    apply: Annotated[
        bool, typer.Option("--apply", help="create the users on the store at QT_REDIS_URL (an admin's URL)")
    ] = False,
    disable_default: Annotated[
        bool, typer.Option(help="with --apply: switch the password-less default user off")
    ] = False,
    before_7_2: Annotated[
        bool,
        typer.Option(
            "--before-7-2", help="the file for a Redis 7.0 or 7.1 (Debian 12's redis-server), which refuses newer rules"
        ),
    ] = False,
) -> None:
    """The per-service ACL users: print them as an ACL file (passwords as SHA-256; with an admin user and the
    default user limited to PING), or create them (--apply).

    Passwords come from <state dir>/secrets/acl-<role>.pass (0600; generated when missing). Give each service
    its URL: redis://qt-apply:<password>@host:port, and so on.
    """
    from redis.exceptions import RedisError

    from quantum_trader.bus.acl import ROLES, acl_file, apply_acl
    from quantum_trader.bus.connection import acl_password_file, node_urls, redact
    from quantum_trader.secrets import ensure_local_secrets, read_secret_file

    settings = settings_or_exit()
    ensure_local_secrets(settings)
    passwords = {role: read_secret_file(acl_password_file(settings, role)) for role in ROLES}
    if not apply:
        # as a store's aclfile: with the admin user and the anonymous default user limited to PING (an aclfile
        # that leaves `default` out would leave it able to do everything)
        print(acl_file(passwords, with_admin=True, before_7_2=before_7_2), end="")
        return
    if not settings.redis_url:
        fail("--apply needs QT_REDIS_URL (with an account allowed to run ACL)", EXIT_USAGE)
    # ACL users are not replicated: with a Sentinel URL, every node the Sentinels know gets them
    for url in asyncio.run(node_urls(settings.redis_url)):
        node = settings.model_copy(update={"redis_url": url})
        try:  # the rules a server does not know are left out for it (apply_acl asks it)
            with_store(node, lambda r: apply_acl(r, passwords, disable_default=disable_default))
        except RedisError as exc:
            fail(f"the store at {redact(url)} refused the users: {exc}")
        print(f"ACL users created on {redact(url)}: {', '.join(sorted(ROLES))}")
    print(f"passwords in {settings.state_dir / 'secrets'}")


@app.command("store-stamp")
def store_stamp_cmd(
    wait: Annotated[float, typer.Option(help="seconds to wait for the store to answer (it may be starting)")] = 30.0,
) -> None:
    """Record the store instance's epoch and stamp how durable it is (CONFIG GET appendonly, appendfsync), with
    an admin account at QT_REDIS_URL. Run it after every start of the store (deploy/systemd: ExecStartPost of
    quantum-store.service): only an instance stamped ``always`` can be restarted without refusing the proposals
    in flight (docs/reliability.md, "A restart that lost nothing")."""
    import asyncio
    import time

    from redis.exceptions import NoPermissionError, RedisError

    from quantum_trader.bus.connection import record_epoch, redact, resolve_redis_url

    settings = settings_or_exit()
    url = resolve_redis_url(settings)
    deadline = time.monotonic() + wait
    while True:
        try:
            durability = asyncio.run(record_epoch(url))
            break
        except NoPermissionError as exc:
            fail(f"the account at QT_REDIS_URL may not stamp the store (an admin's is needed): {exc}")
        except (RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                fail(f"the store at {redact(url)} did not answer within {wait:g} s: {exc}")
            time.sleep(0.2)
    if not durability:
        fail("the store restarted while it was stamped; run qt store-stamp again")
    note = "a restart continues its epoch" if durability == "always" else "a restart begins a new epoch"
    print(f"store epoch recorded; durability: {durability} ({note})")


@app.command("status")
def status_cmd(json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Services (heartbeat, lag, pending), kill switch, Governor mode, unresolved orders, positions and drift."""
    import json

    from quantum_trader.cli.status import render
    from quantum_trader.views.status import collect

    settings = settings_or_exit()
    status = with_store(
        settings,
        lambda r: collect(
            r,
            list(settings.symbols),
            settings.governor.mode,
            max_clock_error_ms=settings.apply.max_clock_error_ms,
            max_host_clock_gap_ms=settings.apply.max_host_clock_gap_ms,
        ),
    )
    if json_out:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        render(status)


JOURNAL_OPTION = typer.Option(
    help="the local audit logs to merge with the store's trail (default: QT_JOURNAL__DIR, else <state dir>/journal; "
    "copy other hosts' files into one directory to merge them all)"
)


def _since(text: str) -> float:
    from quantum_trader.cli.audit import parse_since

    try:
        return parse_since(text)
    except OperatorError as exc:
        fail(str(exc), EXIT_USAGE)


@app.command("audit")
def audit_cmd(
    plan_id: Annotated[str | None, typer.Argument(help="one plan's whole story; omit to list decisions")] = None,
    since: Annotated[str, typer.Option(help="listing period: 90s, 15m, 1h, 24h, 7d")] = "1h",
    symbol: Annotated[str | None, typer.Option(help="only this symbol")] = None,
    issuer: Annotated[str | None, typer.Option(help="governor, operator, p33 or apply")] = None,
    decision: Annotated[str | None, typer.Option(help="allow, deny, consumed, rejected or duplicate")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many (the newest)")] = 200,
    dead_letters: Annotated[
        bool, typer.Option("--dead-letters", help="list the dead letters of the period instead (every stream)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    journal: Annotated[Path | None, JOURNAL_OPTION] = None,
) -> None:
    """The audit trail: one plan's story in time order (proposal, plan, each decision with issuer, reason and
    latency, consumption or rejection, order, result, ledger change), the permit decisions of a period, or
    (--dead-letters) the entries no service could use, with why (--json includes their exact bytes' size)."""
    from quantum_trader.cli import audit
    from quantum_trader.views import trail

    settings = settings_or_exit()
    if dead_letters:
        seconds = _since(since)
        rows = with_store(settings, lambda r: trail.fetch_dead_letters(r, seconds, limit))
        if json_out:
            print(audit.dead_letters_json(rows))
        else:
            audit.print_dead_letters(rows, since)
        return
    local = trail.read_local(journal or settings.journal_dir)
    if plan_id:
        plan, events = with_store(settings, lambda r: trail.fetch_story(r, plan_id, local))
        if json_out:
            print(audit.story_json(plan, events))
        else:
            audit.print_story(plan, events)
        return
    seconds = _since(since)
    entries = with_store(
        settings,
        lambda r: trail.fetch_decisions(
            r, seconds, symbol=symbol, issuer=issuer, decision=decision, limit=limit, local=local
        ),
    )
    if json_out:
        print(audit.decisions_json(entries))
    else:
        audit.print_decisions(entries, since)


@app.command("report")
def report_cmd(
    since: Annotated[str, typer.Option(help="period: 90s, 15m, 1h, 24h, 7d")] = "24h",
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print as a markdown table")] = False,
    journal: Annotated[Path | None, JOURNAL_OPTION] = None,
) -> None:
    """The 24-hour check: plans, executions, timeouts by missing issuer, denies by reason, deny/allow ratio,
    permit wait p50/p99, slowest plans, ledger drift events, service starts."""
    from quantum_trader.cli import audit
    from quantum_trader.views import trail

    settings = settings_or_exit()
    seconds = _since(since)
    local = trail.read_local(journal or settings.journal_dir)
    report = with_store(settings, lambda r: trail.fetch_report(r, seconds, local))
    audit.print_report(report, "json" if json_out else "markdown" if markdown else "table")


@app.command("explain")
def explain_cmd(code: Annotated[str, typer.Argument(help="a reason or error code, e.g. qty_mismatch")]) -> None:
    """What a reason or error code means, its likely cause, and what to do."""
    entry = explain(code)
    if entry is None:
        known = ", ".join(sorted(REGISTRY))
        fail(f"unknown code {code!r}; known codes: {known}", EXIT_USAGE)
    print(f"{entry.code}  ({entry.kind}; issued by {', '.join(entry.issuers)})")
    print(f"  meaning: {entry.meaning}")
    print(f"  cause:   {entry.cause}")
    print(f"  action:  {entry.action}")


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    print(__version__)
