"""The benchmark's report: its shape (written as JSON), the tables, markdown, and the latency-vs-rate plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantum_trader import __version__
from quantum_trader.bench.bounds import StepStatus
from quantum_trader.bench.chain import RateStep
from quantum_trader.bench.durability import DurabilityPart
from quantum_trader.bench.fencing import FencingPart
from quantum_trader.bench.limits import LimitsPart
from quantum_trader.bench.measure import Latency
from quantum_trader.bench.push import PushPart

# in the order they run: "sequential" and "open-loop" include the seed design's run of the same kind
STEPS = ("idle", "sequential", "durability", "fencing", "push", "limits", "open-loop", "decisions")
P99_LIMIT_MS = 50.0  # "sustained" = p99 under this, and the answers keep up with the offered rate
KEEP_UP = 0.95  # answers per second at least this share of the offered rate


@dataclass
class SeedStep:
    target_per_s: float
    offered_per_s: float | None = None
    decided: Latency = field(default_factory=Latency)
    unanswered: int = 0  # plans that did not see both permits in their 12 polls
    errors: int = 0  # plans whose publish or a poll failed (first_error says how)
    first_error: str = ""
    outcome: str = ""  # "" when measured; "timed out" / "failed" for a step that did not finish


@dataclass
class BenchReport:
    version: str = __version__
    machine: dict[str, Any] = field(default_factory=dict)
    event_loop: str = "asyncio"
    steps: list[str] = field(default_factory=lambda: list(STEPS))  # the steps that ran
    plans: int = 0
    warmup: int = 0
    chain_decided: Latency = field(default_factory=Latency)
    chain_result: Latency = field(default_factory=Latency)
    chain_client: Latency = field(default_factory=Latency)
    chain_governor: Latency = field(default_factory=Latency)
    chain_p33: Latency = field(default_factory=Latency)
    seed_decided: Latency = field(default_factory=Latency)
    p50_ratio_seed_over_chain: float | None = None
    open_loop: list[RateStep] = field(default_factory=list)
    seed_open_loop: list[SeedStep] = field(default_factory=list)
    decisions: list[RateStep] = field(default_factory=list)
    durability: list[DurabilityPart] = field(default_factory=list)  # everysec, always, everysec
    fencing: list[FencingPart] = field(default_factory=list)  # single store; HA with consume_replicas 0, 1, 0, 1
    push: list[PushPart] = field(default_factory=list)  # P3.3 with push, without (poll only), with again
    limits: list[LimitsPart] = field(default_factory=list)  # open loop at Binance's real limits, per rate
    # the exchange-has-the-last-word rule: lookups Apply made per sequential plan (0 when the store vouches for
    # every plan), and what one lookup of an order by client id costs
    truth_lookups_per_plan: float | None = None
    truth_lookup: Latency = field(default_factory=Latency)
    sustained_plans_per_s: float | None = None
    sustained_decisions_per_s: float | None = None
    cpu_idle_pct: dict[str, float] = field(default_factory=dict)
    cpu_load_pct: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    idle_window_s: float = 0.0
    load_window_s: float = 0.0
    step_status: list[StepStatus] = field(default_factory=list)  # every bounded step, in the order they ran

    def unfinished(self) -> list[StepStatus]:
        return [s for s in self.step_status if not s.ok]


def sustained(step: RateStep, latency: Latency) -> bool:
    """The step kept up: p99 under the limit and answers at (nearly) the offered rate, nothing left over."""
    return (
        latency.p99_ms is not None
        and latency.p99_ms < P99_LIMIT_MS
        and step.completed == step.sent
        and (step.completed_per_s or 0) >= KEEP_UP * (step.offered_per_s or step.target_per_s)
    )


def highest_sustained(steps: list[RateStep], which: str) -> float | None:
    rates = [s.offered_per_s or s.target_per_s for s in steps if sustained(s, getattr(s, which))]
    return max(rates) if rates else None


# --- text ------------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _num(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def latency_rows(r: BenchReport) -> list[list[str]]:
    def row(name: str, what: Latency) -> list[str]:
        return [name, str(what.samples), _ms(what.p50_ms), _ms(what.p99_ms), _ms(what.max_ms)]

    return [
        row("chain: plan -> both permits consumed (Apply)", r.chain_decided),
        row("chain: plan -> result, order filled (Apply)", r.chain_result),
        row("chain: proposal sent -> result seen (client)", r.chain_client),
        row("chain: plan -> Governor permit written", r.chain_governor),
        row("chain: plan -> P3.3 permit written", r.chain_p33),
        row("seed design: plan -> both permits seen (GET poll)", r.seed_decided),
        row("one order lookup by client id (a plan the store cannot vouch for)", r.truth_lookup),
    ]


LOAD_HEADER = ["offered/s", "answered/s", "plans", "executed", "decided p50", "p99", "result p50", "p99",
               "end-to-end p50", "p99", "seed p50", "p99", "seed decided"]  # fmt: skip


def _seed_decided(seed: SeedStep) -> str:
    if seed.outcome:
        return seed.outcome
    return f"{seed.decided.samples}/{seed.decided.samples + seed.unanswered + seed.errors}"


def load_rows(r: BenchReport, steps: list[RateStep] | None = None) -> list[list[str]]:
    """The open-loop table's rows (of ``steps``, default every open-loop step), each with its seed step."""
    seeds = {s.target_per_s: s for s in r.seed_open_loop}
    rows = []
    for s in r.open_loop if steps is None else steps:
        seed = seeds.get(s.target_per_s, SeedStep(s.target_per_s))
        rows.append(
            [
                _num(s.offered_per_s or s.target_per_s),
                _num(s.completed_per_s),
                s.outcome or f"{s.completed}/{s.sent}",
                str(s.executed),
                _ms(s.decided.p50_ms),
                _ms(s.decided.p99_ms),
                _ms(s.result.p50_ms),
                _ms(s.result.p99_ms),
                _ms(s.end_to_end.p50_ms),
                _ms(s.end_to_end.p99_ms),
                _ms(seed.decided.p50_ms),
                _ms(seed.decided.p99_ms),
                _seed_decided(seed),
            ]
        )
    return rows


DECISION_HEADER = ["offered plans/s", "decided plans/s", "decisions/s", "plans", "p50", "p99", "max", "sustained"]


def decision_rows(r: BenchReport, steps: list[RateStep] | None = None) -> list[list[str]]:
    return [
        [
            _num(s.offered_per_s or s.target_per_s),
            _num(s.completed_per_s),
            _num(2 * s.completed_per_s if s.completed_per_s else None),
            s.outcome or f"{s.completed}/{s.sent}",
            _ms(s.decided.p50_ms),
            _ms(s.decided.p99_ms),
            _ms(s.decided.max_ms),
            "yes" if sustained(s, s.decided) else "no",
        ]
        for s in (r.decisions if steps is None else steps)
    ]


DURABILITY_HEADER = ["appendfsync", "plans", "decided p50", "p99", "result p50", "p99", "CPU ms/plan: store",
                     "brain", "governor", "apply", "AOF bytes/plan", "delayed fsyncs"]  # fmt: skip
DURABILITY_CPU = ("store", "brain", "governor", "apply")


def durability_rows(r: BenchReport) -> list[list[str]]:
    rows = []
    for p in r.durability:
        written = p.aof_written_bytes / (p.plans + p.warmup) if p.aof_written_bytes is not None else None
        rows.append(
            [
                p.appendfsync,
                str(p.plans),
                _ms(p.decided.p50_ms),
                _ms(p.decided.p99_ms),
                _ms(p.result.p50_ms),
                _ms(p.result.p99_ms),
                *[_ms(p.cpu_ms_per_plan.get(name)) for name in DURABILITY_CPU],
                _num(written),
                str(p.aof_delayed_fsync),
            ]
        )
    return rows


def durability_summary(r: BenchReport) -> str | None:
    """always against the mean of the everysec parts, and how far the everysec parts are apart (drift)."""
    every = [p for p in r.durability if p.appendfsync == "everysec"]
    always = [p for p in r.durability if p.appendfsync == "always"]
    if not every or not always:
        return None

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    def diff(get: Any, unit: str) -> str:
        a, e = mean([get(p) for p in always]), mean([get(p) for p in every])
        return f"{a - e:+.2f} {unit}" if a is not None and e is not None else "-"

    text = (
        f"appendfsync always against everysec (mean of {len(every)} parts): "
        f"decided p50 {diff(lambda p: p.decided.p50_ms, 'ms')}, p99 {diff(lambda p: p.decided.p99_ms, 'ms')}; "
        f"result p50 {diff(lambda p: p.result.p50_ms, 'ms')}, p99 {diff(lambda p: p.result.p99_ms, 'ms')}; "
        f"store CPU {diff(lambda p: p.cpu_ms_per_plan.get('store'), 'ms/plan')}"
    )
    p50s = [p.decided.p50_ms for p in every if p.decided.p50_ms is not None]
    if len(p50s) > 1:
        text += f". The everysec parts are {max(p50s) - min(p50s):.2f} ms apart in decided p50 (drift)"
    return text + "."


FENCING_HEADER = ["store", "consume_replicas", "plans", "WAITs", "decided p50", "p99", "result p50", "p99",
                  "CPU ms/plan: store", "brain", "governor", "apply"]  # fmt: skip


def fencing_rows(r: BenchReport) -> list[list[str]]:
    return [
        [
            p.store,
            str(p.consume_replicas),
            str(p.plans),
            str(p.waits),
            _ms(p.decided.p50_ms),
            _ms(p.decided.p99_ms),
            _ms(p.result.p50_ms),
            _ms(p.result.p99_ms),
            *[_ms(p.cpu_ms_per_plan.get(name)) for name in DURABILITY_CPU],
        ]
        for p in r.fencing
    ]


def fencing_summary(r: BenchReport) -> str | None:
    """The HA store against the single one, and the fence (WAIT) against the unfenced HA parts (their mean);
    how far the unfenced parts are apart (drift)."""
    single = [p for p in r.fencing if p.store == "single"]
    open_ = [p for p in r.fencing if p.store == "ha" and p.consume_replicas == 0]
    fenced = [p for p in r.fencing if p.store == "ha" and p.consume_replicas > 0]
    if not single or not open_ or not fenced:
        return None

    def mean(parts: list[FencingPart], get: Any) -> float | None:
        values = [get(p) for p in parts]
        return sum(values) / len(values) if all(v is not None for v in values) else None

    def diff(a: list[FencingPart], b: list[FencingPart], get: Any, unit: str) -> str:
        x, y = mean(a, get), mean(b, get)
        return f"{x - y:+.2f} {unit}" if x is not None and y is not None else "-"

    def against(a: list[FencingPart], b: list[FencingPart]) -> str:
        return (
            f"decided p50 {diff(a, b, lambda p: p.decided.p50_ms, 'ms')}, "
            f"result p50 {diff(a, b, lambda p: p.result.p50_ms, 'ms')}, "
            f"p99 {diff(a, b, lambda p: p.result.p99_ms, 'ms')}; "
            f"Apply CPU {diff(a, b, lambda p: p.cpu_ms_per_plan.get('apply'), 'ms/plan')}, "
            f"store CPU {diff(a, b, lambda p: p.cpu_ms_per_plan.get('store'), 'ms/plan')}"
        )

    text = f"HA unfenced against the single store: {against(open_, single)}. "
    text += f"The fence (WAIT for a replica) against HA unfenced: {against(fenced, open_)}"
    for name, parts in (("unfenced", open_), ("fenced", fenced)):
        p50s = [p.result.p50_ms for p in parts if p.result.p50_ms is not None]
        if len(p50s) > 1:
            text += f". The {name} HA parts are {max(p50s) - min(p50s):.2f} ms apart in result p50 (drift)"
    return text + "."


PUSH_HEADER = ["P3.3", "stream healthy", "outside changes", "to snapshot p50 (ms)", "p99", "max",
               "idle REST weight/min (chain)"]  # fmt: skip


def push_rows(r: BenchReport) -> list[list[str]]:
    return [
        [
            "push" if p.push else "poll only",
            "yes" if p.stream_healthy else "-",
            str(p.changes),
            _ms(p.shown.p50_ms),
            _ms(p.shown.p99_ms),
            _ms(p.shown.max_ms),
            _num(p.weight_per_min),
        ]
        for p in r.push
    ]


LIMITS_HEADER = ["chain", "proposals/s", "s", "sent", "executed", "closes/s", "rate_limited", "own-load refusals",
                 "other", "REST weight", "weight/min", "weight/executed", "e2e p50 (ms)", "p99"]  # fmt: skip


def limits_rows(r: BenchReport) -> list[list[str]]:
    rows = []
    for p in r.limits:
        other = p.answered - p.executed - p.rate_limited - p.own_load + (p.sent - p.answered)
        rows.append([_chain(p.mode), _num(p.rate_per_s), _num(p.seconds), str(p.sent), str(p.executed),
                     _num(p.closes_per_s), str(p.rate_limited), str(p.own_load), str(other), str(p.weight),
                     _num(p.weight_per_min), _num(p.weight_per_executed), _ms(p.end_to_end.p50_ms),
                     _ms(p.end_to_end.p99_ms)])  # fmt: skip
    return rows


def _chain(mode: str) -> str:
    return "push (as shipped)" if mode == "push" else "poll only (before the stream)"


def limits_notes(r: BenchReport) -> list[str]:
    """What a reader needs beside the table: the refusals other than rate_limited, a rate_limited reason as
    clients read it, and the REST requests by endpoint."""
    notes = []
    for p in r.limits:
        other = {k: v for k, v in p.outcomes.items() if k not in ("executed", "rate_limited")}
        requests = ", ".join(f"{name} {count}" for name, count in p.requests.items())
        part = f"{p.rate_per_s:g}/s ({p.mode})"
        notes.append(f"{part}: other outcomes {other or 'none'}; REST requests: {requests or 'none'}")
        if p.limit_named:
            notes.append(f"{part}: a rate_limited reason: {p.limit_named}")
    return notes


def cost_rows(r: BenchReport) -> list[list[str]]:
    rows = []
    for name in r.rss_mb:
        row = [name, str(r.cpu_idle_pct.get(name)), str(r.cpu_load_pct.get(name))]
        row += [str(s.cpu_pct.get(name, "-")) for s in r.open_loop]
        rows.append([*row, str(r.rss_mb[name])])
    return rows


def cost_header(r: BenchReport) -> list[str]:
    return ["process", "CPU idle %", "CPU sequential %", *[f"CPU @{s.target_per_s:.0f}/s %" for s in r.open_loop],
            "RSS MB"]  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *[f"| {' | '.join(row)} |" for row in rows]]


def markdown(r: BenchReport) -> str:
    head = f"qt bench {r.version} on {r.machine.get('cpus')} CPUs, Python {r.machine.get('python')}, "
    head += f"event loop {r.event_loop}"
    if "sequential" in r.steps:
        head += f"; {r.plans} sequential plans after {r.warmup} warm-up"
    if r.steps != list(STEPS):
        head += f"; steps: {', '.join(r.steps)} only"
    lines = [head, ""]
    if "sequential" in r.steps:
        lines += [*_table(["latency (ms)", "samples", "p50", "p99", "max"], latency_rows(r)), ""]
        lines += [f"p50 ratio, seed design / chain (both permits known): **{r.p50_ratio_seed_over_chain}x**", ""]
        lines += [f"Exchange lookups per sequential plan (the store vouched for each): **{r.truth_lookups_per_plan}**;"
                  " a plan it cannot vouch for pays one order lookup (row above).", ""]  # fmt: skip
    if r.durability:
        first = r.durability[0]
        lines += [f"Durability: the sequential chain under each appendfsync setting in turn (CONFIG SET on the "
                  f"running store, read back before and after each part), {first.plans} plans per part after "
                  f"{first.warmup} warm-up; latencies in ms, CPU in ms per plan sent (warm-up included):",
                  ""]  # fmt: skip
        lines += [*_table(DURABILITY_HEADER, durability_rows(r)), ""]
        summary = durability_summary(r)
        lines += [summary, ""] if summary else []
    if r.fencing:
        part0 = r.fencing[0]
        lines += [f"High availability and its fence: the sequential chain on the single store, then on a primary "
                  f"with two replicas and three Sentinels with Apply's consume_replicas 0, 1 (WAIT for a replica "
                  f"before the order), 0, 1; {part0.plans} plans per part after {part0.warmup} warm-up; latencies in "
                  f"ms, CPU in ms per plan sent (store: the primary):", ""]  # fmt: skip
        lines += [*_table(FENCING_HEADER, fencing_rows(r)), ""]
        summary = fencing_summary(r)
        lines += [summary, ""] if summary else []
    if r.push:
        lines += [f"Positions pushed by the exchange: an outside change (a position set on the simulator) to P3.3's "
                  f"snapshot showing it, with the user-data stream, with push off (the poll), and with it again; "
                  f"the whole chain's REST weight per minute over {r.push[0].idle_s:g} s idle:", ""]  # fmt: skip
        lines += [*_table(PUSH_HEADER, push_rows(r)), ""]
    if r.limits:
        lines += ["At Binance's real limits (2,400 weight, 300 orders per 10 s, 1,200 per minute; the simulator's "
                  "defaults), policy limits opened, five symbols, open loop; REST weight of the whole chain as the "
                  "simulator counted it:", ""]  # fmt: skip
        lines += [*_table(LIMITS_HEADER, limits_rows(r)), ""]
        lines += [*(f"- {note}" for note in limits_notes(r)), ""]
    if r.open_loop:
        lines += ["Open loop through the whole chain (latencies in ms; warm-up excluded):", ""]
        lines += [*_table(LOAD_HEADER, load_rows(r)), ""]
        lines += [f"highest sustained (p99 result < {P99_LIMIT_MS:.0f} ms, answers keeping up): "
                  f"**{_num(r.sustained_plans_per_s)} plans/s**", ""]  # fmt: skip
    if r.decisions:
        lines += ["Decisions (plans straight onto the plan stream, both issuers deciding; ms):", ""]
        lines += [*_table(DECISION_HEADER, decision_rows(r)), ""]
        best = r.sustained_decisions_per_s
        lines += [f"highest sustained: **{_num(best)} plans/s = {_num(2 * best if best else None)} decisions/s**", ""]
    if r.rss_mb:
        lines += [*_table(cost_header(r), cost_rows(r)), ""]
        lines += [f"idle window {r.idle_window_s} s, sequential window {r.load_window_s} s (one core = 100 %).", ""]
    if unfinished := r.unfinished():
        lines += ["Steps that did not finish (their figures above are missing or partial):", ""]
        lines += [f"- {s.line()}" for s in unfinished]
    return "\n".join(lines).rstrip("\n") + "\n"


# --- files -----------------------------------------------------------------------------------------------------


def write(r: BenchReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    written[0].write_text(json.dumps(asdict(r), indent=2) + "\n")
    written[1].write_text(markdown(r))
    plot = out / "latency-vs-rate.png"
    if plot_json(written[0], plot):
        written.append(plot)
    return written


def plot_json(source: Path, target: Path) -> bool:
    """Latency against achieved rate, from a bench.json: the chain (open loop), the decisions ceiling and the
    seed design. False when there is nothing to plot."""
    data = json.loads(source.read_text())
    series = []
    for name, key, steps in (
        ("chain: plan -> result", "result", data.get("open_loop", [])),
        ("chain: plan -> both permits consumed", "decided", data.get("open_loop", [])),
        ("decisions only: plan -> both permits written", "decided", data.get("decisions", [])),
        ("seed design: plan -> both permits seen", "decided", data.get("seed_open_loop", [])),
    ):
        points = [(s["offered_per_s"], s[key]["p50_ms"], s[key]["p99_ms"]) for s in steps if s[key]["p50_ms"]]
        if points:
            series.append((name, points))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for (name, points), color in zip(series, ("tab:blue", "tab:green", "tab:orange", "tab:red"), strict=False):
        rates = [p[0] for p in points]
        ax.plot(rates, [p[1] for p in points], "o-", color=color, label=f"{name}, p50")
        ax.plot(rates, [p[2] for p in points], "s--", color=color, alpha=0.6, label=f"{name}, p99")
    ax.axhline(P99_LIMIT_MS, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered plans per second (achieved by the sender)")
    ax.set_ylabel("latency, ms")
    machine = data.get("machine", {})
    ax.set_title(f"qt bench {data.get('version')}: latency vs rate ({machine.get('cpus')} CPUs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return True
