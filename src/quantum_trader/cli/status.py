"""``qt status``: the chain at a glance (views/status.py reads it from the store; this module prints it)."""

from __future__ import annotations

from decimal import Decimal

from quantum_trader.views.status import Status


def _stream(s: dict[str, object]) -> str:
    state = s.get("stream", "off")
    if state == "off":
        return "off (poll only)"
    counts = f"reconnects {s['stream_reconnects']} · renewals {s['stream_renewals']} · resyncs {s['stream_resyncs']}"
    age = s.get("stream_last_event_age_s", -1.0)
    last = f" · last event {age} s ago" if isinstance(age, float) and age >= 0 else ""
    if state == "healthy":
        return f"healthy · {counts}{last}"
    return f"[red]down[/red] ({s.get('stream_error') or 'connecting'}) · {counts}"


def render(status: Status) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console

    services = Table(title="services", title_justify="left")
    for column in ("service", "consumer", "pid", "ready", "heartbeat", "lag", "pending", "user-data stream"):
        services.add_column(column)
    for s in status.services:
        services.add_row(
            s["service"],
            s["consumer"],
            str(s["pid"]),
            "yes" if s["ready"] else "[red]no[/red]",
            f"{s['heartbeat_age_s']} s ago",
            str(s["lag"]),
            str(s["pending"]),
            _stream(s),
        )
    if not status.services:
        services.add_row("[red]none running[/red]", "", "", "", "", "", "", "")
    console.print(services)
    switch = "[red]ON: every plan is denied[/red]" if status.kill_switch else "off"
    console.print(
        f"kill switch: {switch}   Governor mode: {status.governor_mode}   unresolved orders: {status.unresolved_orders}"
    )
    if status.clocks:
        clocks = Table(title="Apply clocks (offset to the exchange)", title_justify="left")
        for column in ("consumer", "offset", "error", "published"):
            clocks.add_column(column)
        for c in status.clocks:
            if c.get("unreadable"):
                clocks.add_row(c["consumer"], "[red]unreadable[/red]", "", "")
            else:
                clocks.add_row(c["consumer"], f"{c['offset_ms']} ms", f"±{c['error_ms']} ms", f"{c['age_s']} s ago")
        console.print(clocks)
    store = status.store
    if store:
        line = f"store: epoch of {store.get('run_id') or '?'}"
        if store.get("epoch_age_s") is not None:
            line += f", begun {store['epoch_age_s']} s ago"
        if store.get("continued"):
            line += f", continued through {store['continued']} restart(s) that lost nothing"
        line += f", durability stamp: {store.get('durability') or 'none'}"
        if store.get("lost"):
            line += " [red](begun after the store lost writes an Apply had read)[/red]"
        console.print(line)
    if "primary" in store:
        nodes = Table(title=f"store nodes (Sentinels: {store.get('sentinels', '?')})", title_justify="left")
        for column in ("role", "address", "flags", "link", "replication offset", "lag (bytes)"):
            nodes.add_column(column)
        nodes.add_row("primary", str(store["primary"]), str(store.get("primary_flags", "")), "", "", "")
        for replica in store.get("replicas", []):
            link = replica["link"] if replica["link"] == "ok" else f"[red]{replica['link']}[/red]"
            lag = str(replica.get("lag_bytes", "-"))
            nodes.add_row("replica", replica["address"], replica["flags"], link, str(replica["offset"]), lag)
        console.print(nodes)
    if status.clocks_problem:
        console.print(f"[red]clocks out of bounds (Apply plans nothing): {status.clocks_problem}[/red]")
    positions = Table(title="positions", title_justify="left")
    for column in ("symbol", "exchange", "ledger", "drift", "snapshot age", "plan in flight"):
        positions.add_column(column)
    for row in status.symbols:
        drift = row["drift"]
        shown = f"[red]{drift}[/red]" if drift and Decimal(drift) != 0 else drift
        age = f"{row['snapshot_age_s']} s" if row["snapshot_age_s"] is not None else "—"
        positions.add_row(row["symbol"], row["exchange"], row["ledger"], shown, age, row["in_flight"])
    console.print(positions)
