"""make mutation: mutation testing of the order path, bounded in time, with a per-file report.

Stages, run in this order (``MUTATION_STAGES`` picks some, comma-separated):

- ``domain``: mutmut over src/quantum_trader/domain/ against tests/unit (the [tool.mutmut] section of
  pyproject.toml is this stage).
- ``order-path``: mutmut over services/apply/ (the executor, the handler, the permit wait, ...) and
  bus/scripts.py against tests/unit plus the few integration tests that drive them (``ORDER_PATH_TESTS``;
  ``ORDER_PATH_FILES``, comma-separated, narrows the files).
- ``lua``: the hand-listed Lua mutants of tools/lua_mutants.py, one pytest run each.

Each mutmut stage runs in its own workspace, .qt/mutation/<stage>/ (symlinks to src, tests, docs, deploy, tools and a
pyproject.toml whose [tool.mutmut] has the stage's files and tests), because mutmut keeps one test selection
per mutants/ folder and the domain mutants must not wait for integration tests. mutmut keeps its results
there: a later run resumes (killed mutants of unchanged functions stay killed; survivors, interrupted and
unchecked mutants are run again, so a new test shows at once). ``MUTATION_FRESH=1`` deletes the workspaces;
``MUTATION_REPORT_ONLY=1`` runs nothing and writes the report of what the workspaces hold (mutmut stages).
``MUTATION_CHILDREN`` (default 1) runs that many mutants at once, each on its own embedded Valkey.

The whole run is bounded by ``MUTATION_MINUTES`` (default 20): each stage gets an equal share of what is
left when it starts (time a stage does not use goes to the next ones); a stage that reaches its share is
interrupted and reports how far it got (mutants not checked). The report is .qt/mutation/report.md (and
report.json): per file, mutants, killed, survived, timed out, equivalent (a survivor listed in
mutation/equivalent.toml with its reason), no tests, not checked; then every survivor that is not listed,
with its diff line, and listed equivalents that no longer match their mutant (stale).
Exit status: 0 when the report was written, whatever it says (the tool measures; it does not gate).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import log_only  # tools/ is not a package: its modules import each other by path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".qt" / "mutation"
EQUIVALENTS = ROOT / "mutation" / "equivalent.toml"
VENV_BIN = Path(sys.executable).parent
# What the tests read besides src/ and tests/ (mutmut copies tests/ and pyproject.toml itself).
LINKED = ("src", "tests", "docs", "deploy", "tools")

ORDER_PATH_FILES = [
    "src/quantum_trader/services/apply/*.py",
    "src/quantum_trader/bus/scripts.py",
    "src/quantum_trader/bus/lua.py",
]
ORDER_PATH_TESTS = [
    "tests/unit",
    "tests/integration/test_scripts.py",
    "tests/integration/test_order_path_edges.py",
    "tests/integration/test_apply_handler.py",
    "tests/integration/test_apply_service.py",
    "tests/integration/test_apply_sweep.py",
    "tests/integration/test_permit_waiter.py",
]


@dataclass(frozen=True)
class Stage:
    name: str
    mutate: list[str]  # only_mutate globs, relative to the workspace (src/...)
    tests: list[str]
    pytest_args: tuple[str, ...] = ()  # added to pyproject's pytest_add_cli_args for this stage


# A mutant that makes a rig test hang (a loop that never waits, a wait that never ends) fails that test after
# this long (pytest-timeout), instead of running until mutmut's CPU limit: 30x the tests' clean time, which for
# a function every rig test reaches is a quarter of an hour. The rig tests take a few seconds each.
ORDER_PATH_TEST_TIMEOUT_S = 45


def stages() -> list[Stage]:
    base = mutmut_section()
    extra = os.environ.get("ORDER_PATH_TESTS")
    files = os.environ.get("ORDER_PATH_FILES")
    return [
        Stage("domain", list(base["only_mutate"]), list(base["pytest_add_cli_args_test_selection"])),
        Stage(
            "order-path",
            files.split(",") if files else ORDER_PATH_FILES,
            extra.split(",") if extra else ORDER_PATH_TESTS,
            ("--timeout", str(ORDER_PATH_TEST_TIMEOUT_S)),
        ),
    ]


def mutmut_section() -> dict[str, Any]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    section: dict[str, Any] = data["tool"]["mutmut"]
    return section


# --- workspace ----------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of these characters is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def stage_pyproject(stage: Stage) -> str:
    """pyproject.toml as it is, with [tool.mutmut] replaced by the stage's (pytest's own config stays)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "[tool.mutmut]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    section = dict(mutmut_section())
    section["only_mutate"] = stage.mutate
    section["pytest_add_cli_args_test_selection"] = stage.tests
    section["pytest_add_cli_args"] = [*section.get("pytest_add_cli_args", []), *stage.pytest_args]
    body = [f"{key} = {toml_value(value)}" for key, value in section.items()]
    return "\n".join([*lines[:start], "[tool.mutmut]", *body, *lines[end:]]) + "\n"


def workspace(stage: Stage) -> Path:
    ws = OUT / stage.name
    ws.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = ws / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    pyproject = ws / "pyproject.toml"
    text = stage_pyproject(stage)
    # rewritten only on a change, so mutmut's cache (keyed on the config) survives runs
    if not pyproject.exists() or pyproject.read_text(encoding="utf-8") != text:
        pyproject.write_text(text, encoding="utf-8")
    return ws


def meta_files(ws: Path) -> list[Path]:
    return sorted((ws / "mutants" / "src").rglob("*.py.meta"))


def forget_unmutated_copies(ws: Path, stage: Stage) -> None:
    """Delete mutmut's plain copies of files the stage mutates now but did not before (an ORDER_PATH_FILES run
    narrowed it): mutmut takes a copy newer than its source for done and would never mutate that file."""
    mutants = ws / "mutants"
    for pattern in stage.mutate:
        for copy in mutants.glob(pattern):
            if copy.suffix == ".py" and not copy.with_name(copy.name + ".meta").exists():
                copy.unlink()


def retry_unsettled(ws: Path) -> int:
    """Mark survivors, interrupted mutants and those no test reached as not checked, so this run tries them
    again (a test added since may reach or kill them; mutmut itself keeps every recorded verdict)."""
    reset = 0
    for meta in meta_files(ws):
        data = json.loads(meta.read_text(encoding="utf-8"))
        codes: dict[str, int | None] = data["exit_code_by_key"]
        for key, code in codes.items():
            if code in (0, 2, 5, 33):  # survived, interrupted, no tests (pytest's 5, mutmut's 33)
                codes[key] = None
                reset += 1
        meta.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return reset


# --- running ------------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    name: str
    budget_s: float
    seconds: float = 0.0
    hit_bound: bool = False
    reached_mutants: bool = False  # mutmut got past its stats and clean-test runs
    exit_code: int | None = None
    note: str = ""


def one_store() -> str:
    """The store each mutant's integration tests run on (tests/conftest.py QT_TEST_STORES): the machine's Redis
    when it answers at QT_TEST_REDIS_URL (nothing to start per mutant), else the embedded Valkey. One store,
    not both: a skipped test passes, so a store the tests cannot reach must never be the one chosen."""
    import redis

    url = os.environ.get("QT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        version = str(redis.Redis.from_url(url, socket_connect_timeout=0.5).info("server")["redis_version"])
    except (redis.RedisError, OSError, KeyError):
        return "valkey"
    return "redis" if int(version.split(".", maxsplit=1)[0]) >= 7 else "valkey"  # conftest: 7 or newer


def run_mutmut(stage: Stage, budget_s: float) -> StageRun:
    ws = workspace(stage)
    # Workers at once (MUTATION_CHILDREN, default 1: the machine's 2 cores are shared). Two or more share no
    # Redis database: each mutant's tests then run on an embedded Valkey of their own.
    children = max(1, int(os.environ.get("MUTATION_CHILDREN", "1")))
    store = os.environ.get("QT_TEST_STORES") or (one_store() if children == 1 else "valkey")
    forget_unmutated_copies(ws, stage)
    retry_unsettled(ws)
    # Which tests reach which function is measured afresh each run: mutmut keeps the last run's map and would
    # not run a test added since against a function it had never seen it reach (a survivor a test kills).
    (ws / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    log = ws / "run.log"
    started = time.monotonic()
    result = StageRun(stage.name, budget_s)
    with log.open("w", encoding="utf-8") as out:
        # its own session, so a hung stage can be ended with every worker it forked
        proc = subprocess.Popen(
            [str(VENV_BIN / "mutmut"), "run", "--max-children", str(children)],
            cwd=ws,
            env={**os.environ, "QT_TEST_STORES": store},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGINT is how the bound stops it (below); a shell's background job has SIGINT ignored, and a
            # Python started with it ignored never turns it into KeyboardInterrupt
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
        )
        try:
            result.exit_code = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            result.hit_bound = True
            proc.send_signal(signal.SIGINT)  # mutmut stops its workers and keeps every recorded verdict
            try:
                result.exit_code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                result.exit_code = proc.wait()
        # what outlived it in its session: the embedded stores of workers stopped mid-test (by the bound, or by
        # mutmut's CPU limit), which no test teardown will stop
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    result.seconds = time.monotonic() - started
    text = log.read_text(encoding="utf-8", errors="replace")
    result.reached_mutants = "Running mutation testing" in text
    if not result.reached_mutants:
        result.note = "stopped before testing mutants (stats or clean-test run); see " + str(log.relative_to(ROOT))
    elif result.exit_code not in (0, None) and not result.hit_bound:
        result.note = f"mutmut exited {result.exit_code}; see {log.relative_to(ROOT)}"
    return result


# --- results ------------------------------------------------------------------------------------------------

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 37: "killed"}
TIMEOUT_CODES = {36, -24, 24, 152, 255}


def status_of(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in TIMEOUT_CODES:
        return "timeout"
    if code == 2:
        return "not checked"  # interrupted by the bound
    return STATUS.get(code, "suspicious")


@dataclass
class Equivalent:
    name: str
    mutation: str  # the mutant's + line, as mutmut shows it: a listed entry must still describe its mutant
    reason: str


@dataclass(frozen=True)
class Mutant:
    diff: str  # the changed lines, "-" the code, "+" the mutant
    original: str  # the function's source (empty when mutmut's index could not give it)
    mutated: str

    @property
    def log_only(self) -> bool:
        return bool(self.original) and log_only.only_log_arguments_differ(self.original, self.mutated)


def load_equivalents() -> dict[str, Equivalent]:
    if not EQUIVALENTS.exists():
        return {}
    data = tomllib.loads(EQUIVALENTS.read_text(encoding="utf-8"))
    return {
        e["mutant"]: Equivalent(e["mutant"], e["mutation"].strip(), e["reason"]) for e in data.get("equivalent", [])
    }


def diff_lines(ws: Path, names: list[str]) -> dict[str, Mutant]:
    """Each mutant's changed lines (-old / +new) and its function's source before and after, read from mutmut's
    generated files."""
    if not names:
        return {}
    script = (
        "import json, sys\n"
        "import libcst as cst\n"
        "from mutmut.mutation.diff_apply import get_diff_for_mutant, read_functions_from_index\n"
        "out = {}\n"
        "for name, path in json.load(sys.stdin):\n"
        "    d = get_diff_for_mutant(name, path=path).splitlines()\n"
        "    both = read_functions_from_index(name, path) or (None, None)\n"
        "    code = [cst.Module([f]).code if f is not None else '' for f in both]\n"
        "    diff = '\\n'.join(x for x in d if x[:1] in '+-' and x[:3] not in ('+++', '---'))\n"
        "    out[name] = [diff, *code]\n"
        "print(json.dumps(out))\n"
    )
    pairs = [[name, path_of(name)] for name in names]
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ws, input=json.dumps(pairs), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        why = f"(diff unavailable: {proc.stderr.strip().splitlines()[-1:]})"
        return {name: Mutant(why, "", "") for name in names}
    return {name: Mutant(*parts) for name, parts in json.loads(proc.stdout).items()}


def path_of(mutant: str) -> str:
    module = mutant.partition(".x_")[0].partition(".xǁ")[0]
    rel = Path("src", *module.split("."))
    return str(rel.with_suffix(".py")) if (ROOT / rel.with_suffix(".py")).exists() else str(rel / "__init__.py")


def plus_line(diff: str) -> str:
    return "\n".join(line[1:].strip() for line in diff.splitlines() if line.startswith("+"))


def collect(ws: Path, equivalents: dict[str, Equivalent]) -> dict[str, Any]:
    per_file: dict[str, Counter[str]] = {}
    survivors: list[str] = []
    for meta in meta_files(ws):
        rel = str(meta.relative_to(ws / "mutants"))[: -len(".meta")]
        data = json.loads(meta.read_text(encoding="utf-8"))
        counts: Counter[str] = Counter()
        for name, code in data["exit_code_by_key"].items():
            status = status_of(code)
            counts[status] += 1
            if status == "survived":
                survivors.append(name)
        if counts:
            per_file[rel] = counts
    mutants = diff_lines(ws, survivors)
    unlisted: list[dict[str, str]] = []
    stale: list[str] = []
    equivalent: list[str] = []
    logged: list[str] = []
    for name in survivors:
        mutant = mutants.get(name, Mutant("", "", ""))
        listed = equivalents.get(name)
        rel = path_of(name)
        if (listed and listed.mutation == plus_line(mutant.diff)) or (not listed and mutant.log_only):
            per_file[rel]["survived"] -= 1
            per_file[rel]["equivalent"] += 1
            (equivalent if listed else logged).append(name)
        else:
            unlisted.append({"mutant": name, "diff": mutant.diff})
            if listed:
                stale.append(name)
    return {
        "files": {k: dict(v) for k, v in per_file.items()},
        "survivors": unlisted,
        "equivalent": equivalent,
        "log_only": logged,
        "stale_equivalents": stale,
    }


# --- report -------------------------------------------------------------------------------------------------

COLUMNS = ["mutants", "killed", "survived", "timeout", "equivalent", "no tests", "not checked", "other"]


def row(counts: dict[str, int]) -> list[int]:
    known = {"killed", "survived", "timeout", "equivalent", "no tests", "not checked"}
    return [
        sum(counts.values()),
        *(counts.get(c, 0) for c in COLUMNS[1:-1]),
        sum(v for k, v in counts.items() if k not in known),
    ]


def table(files: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| file | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    total: Counter[str] = Counter()
    for name, counts in sorted(files.items()):
        total.update(counts)
        lines.append(f"| {name} | " + " | ".join(str(n) for n in row(counts)) + " |")
    lines.append("| **all** | " + " | ".join(f"**{n}**" for n in row(dict(total))) + " |")
    return lines


def write_report(runs: list[StageRun], results: dict[str, dict[str, Any]], bound_min: float) -> Path:
    md = [
        "# Mutation report",
        "",
        f"Bound: {bound_min:g} min for the whole run. How to read this: docs/mutation.md.",
        "",
    ]
    for run in runs:
        res = results[run.name]
        md += [f"## {run.name}", ""]
        state = "reached its share of the bound; interrupted" if run.hit_bound else "finished"
        md += [f"{run.seconds / 60:.1f} min of a {run.budget_s / 60:.1f} min share: {state}."]
        if run.note:
            md += ["", f"Note: {run.note}"]
        md += ["", *table(res["files"]), ""]
        if res.get("log_only"):
            md += [
                f"Of the equivalent, {len(res['log_only'])} change only a log call's arguments: {log_only.REASON}.",
                "",
            ]
        if res.get("stale_equivalents"):
            md += ["Listed as equivalent but the mutant no longer matches its entry (counted as survived):", ""]
            md += [f"- {name}" for name in res["stale_equivalents"]] + [""]
        if res["survivors"]:
            md += ["Survivors not listed as equivalent:", ""]
            for s in res["survivors"]:
                md += [f"- `{s['mutant']}`", "", "  ```diff", *("  " + x for x in s["diff"].splitlines()), "  ```"]
            md += [""]
    path = OUT / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    (OUT / "report.json").write_text(
        json.dumps({"runs": [r.__dict__ for r in runs], "results": results}, indent=2), encoding="utf-8"
    )
    return path


def main() -> int:
    bound_min = float(os.environ.get("MUTATION_MINUTES", "20"))
    wanted = [s for s in os.environ.get("MUTATION_STAGES", "domain,order-path,lua").split(",") if s]
    known = {s.name for s in stages()} | {"lua"}
    unknown = set(wanted) - known
    if unknown:
        print(f"unknown stage(s) {sorted(unknown)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    if os.environ.get("MUTATION_FRESH") == "1":
        shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + bound_min * 60
    equivalents = load_equivalents()
    if os.environ.get("MUTATION_REPORT_ONLY") == "1":  # the lua stage keeps no verdicts to report
        wanted = [name for name in wanted if name != "lua"]
    runs: list[StageRun] = []
    results: dict[str, dict[str, Any]] = {}
    by_name = {s.name: s for s in stages()}
    for i, name in enumerate(wanted):
        share = max(deadline - time.monotonic(), 0.0) / (len(wanted) - i)
        print(f"mutation: stage {name}, {share / 60:.1f} min", flush=True)
        if name == "lua":
            import lua_mutants

            run = StageRun(name, share)
            started = time.monotonic()
            outcome = lua_mutants.run_all(budget_s=share)
            run.seconds = time.monotonic() - started
            run.hit_bound = outcome.hit_bound
            results[name] = outcome.as_result()
        elif os.environ.get("MUTATION_REPORT_ONLY") == "1":  # the verdicts mutmut recorded, run nothing
            run = StageRun(name, 0.0, note="report only: the verdicts of earlier runs, nothing run now")
            results[name] = collect(OUT / name, equivalents)
        else:
            run = run_mutmut(by_name[name], share)
            results[name] = collect(OUT / name, equivalents)
        runs.append(run)
        total = Counter[str]()
        for counts in results[name]["files"].values():
            total.update(counts)
        print(f"mutation: {name}: {dict(total)} in {run.seconds / 60:.1f} min", flush=True)
    path = write_report(runs, results, bound_min)
    print(f"mutation: report in {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
