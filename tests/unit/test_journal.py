"""The local audit log (journal.py) and its merge with the store's trail (domain/story.py ``merge_local``): lines
written are read back, rotation keeps what it says, a line a crash cut short or hostile bytes are skipped and
counted, a write that fails never raises into the service, and the merge adds exactly the lines the store lost."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from quantum_trader.domain.story import KEPT_IN, merge_local, one_per_plan, plan_story
from quantum_trader.journal import Journal, open_journal, read_journal
from quantum_trader.settings import Settings

AUDIT = "quantum:stream:audit"
RESULTS = "quantum:stream:apply.result"


def _line(n: int, at: float = 1_700_000_000.0) -> dict[str, str]:
    return {"plan_id": f"p{n}", "issuer": "governor", "decision": "allow", "reason": "ok", "at": repr(at + n)}


def test_lines_are_read_back_as_written_with_the_writer_and_the_entry_id(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "apply", host="h1", name="apply-1")
    journal.append(AUDIT, _line(1))
    journal.append(RESULTS, {"plan_id": "p1", "executed": "true", "permit": b"\xff\x00raw"}, "1700000001000-0")
    journal.close()
    read = read_journal(tmp_path)
    assert [(r.stream, r.entry_id, r.service, r.host) for r in read.records] == [
        (AUDIT, "", "apply", "h1"),
        (RESULTS, "1700000001000-0", "apply", "h1"),
    ]
    assert read.records[0].fields == _line(1)
    # bytes are kept as the store keeps them (decoded with surrogateescape), so the two copies compare equal
    assert read.records[1].fields["permit"] == b"\xff\x00raw".decode("utf-8", "surrogateescape")
    assert (tmp_path / "apply.apply-1.h1.jsonl").exists() and read.unreadable == {}


def test_a_line_cut_short_by_a_crash_and_hostile_bytes_are_skipped_and_counted(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "brain", host="h1")
    journal.append(AUDIT, _line(1))
    journal.append(AUDIT, _line(2))
    journal.close()
    path = tmp_path / "brain.brain.h1.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"stream": "x", "fields": {"a": 1}}\n')  # not ours: a field that is not text
        handle.write(b"\xff\xfe not json at all\n")
        handle.write(b'[1, 2]\n{"stream": "quantum:stream:audit", "fields": {"plan_id": "p3", "at')  # torn at the end
    read = read_journal(tmp_path)
    assert [r.fields["plan_id"] for r in read.records] == ["p1", "p2"]
    assert read.unreadable == {"brain.brain.h1.jsonl": 4}


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next_writers_first_line(tmp_path: Path) -> None:
    path = tmp_path / "apply.apply.h.jsonl"
    path.write_bytes(b'{"stream": "quantum:stream:audit", "fields": {"plan_id": "p0", "at')  # power lost mid-line
    journal = Journal(tmp_path, "apply", host="h")
    journal.append(AUDIT, _line(1))
    journal.close()
    read = read_journal(tmp_path)
    assert [r.fields["plan_id"] for r in read.records] == ["p1"] and read.unreadable == {path.name: 1}


def test_a_rotation_that_fails_keeps_every_line_and_is_not_tried_at_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[Path] = []

    def refuse(self: Path, target: Path) -> Path:
        tries.append(self)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "rename", refuse)
    journal = Journal(tmp_path, "apply", host="h", max_bytes=400, keep=2)
    for n in range(6):
        journal.append(AUDIT, _line(n))
    journal.close()
    assert [int(r.fields["plan_id"][1:]) for r in read_journal(tmp_path).records] == list(range(6))
    assert 1 <= len(tries) <= 2  # once per max_bytes, not once per line


def test_closing_never_raises_into_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path, "apply", host="h")
    journal.append(AUDIT, _line(1))

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    journal.close()  # logged, not raised
    assert journal.append(AUDIT, _line(2)) is True  # reopened at the next line


def test_a_file_that_cannot_be_read_is_named_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quantum_trader.journal as journal_module

    (tmp_path / "apply.apply.h.jsonl").write_text("")

    def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(journal_module, "open", denied, raising=False)
    read = read_journal(tmp_path)
    assert read.records == [] and read.unreadable == {"apply.apply.h.jsonl (Permission denied)": 1}


def test_a_full_file_is_rotated_and_only_keep_rotated_files_remain(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "governor", host="h", max_bytes=400, keep=2)
    for n in range(20):
        journal.append(AUDIT, _line(n))
    journal.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["governor.governor.h.jsonl", "governor.governor.h.jsonl.1", "governor.governor.h.jsonl.2"]
    assert all(p.stat().st_size <= 400 for p in tmp_path.iterdir())
    kept = [int(r.fields["plan_id"][1:]) for r in read_journal(tmp_path).records]
    # the newest lines are kept, whole, and nothing twice; the oldest went with the file beyond keep
    assert kept and kept[-1] == 19 and len(set(kept)) == len(kept) and set(kept) == set(range(20 - len(kept), 20))


def test_a_write_that_fails_is_logged_and_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the directory should be")
    journal = Journal(blocked, "apply", host="h")
    journal.append(AUDIT, _line(1))
    journal.append(AUDIT, _line(2))  # a run of failures is logged once
    assert "the local audit log cannot be written" in capsys.readouterr().out + capsys.readouterr().err


def test_the_batch_sync_runs_only_when_something_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    journal = Journal(tmp_path, "apply", host="h", fsync_s=0.01)

    async def run() -> None:
        task = asyncio.create_task(journal.sync_forever())
        await asyncio.sleep(0.05)
        assert synced == []  # nothing written, nothing synced
        journal.append(AUDIT, _line(1))
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run())
    assert len(synced) == 1  # one batch, not one per round
    journal.close()


def test_an_operators_journal_syncs_each_line_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    settings = Settings(state_dir=tmp_path, _env_prefix="QT_IGNORED_")
    journal = open_journal(settings, "operator", sync_each=True)
    journal.append("quantum:stream:ops.audit", {"action": "kill_switch", "value": "on", "at": "1.0"})
    assert len(synced) == 1 and journal.path.parent == tmp_path / "journal"


# --- the merge --------------------------------------------------------------------------------------------------


def test_the_merge_adds_exactly_the_lines_the_store_lost_marked_with_who_kept_them() -> None:
    stored = [("1700000001000-0", _line(1)), ("1700000003000-0", _line(3))]
    local = [
        (("", _line(1)), "h1:governor"),  # the store has it: not added
        (("", _line(2)), "h1:governor"),  # lost by the store
        (("", _line(2)), "h2:governor"),  # the same line in a second journal: once
        (("1700000004000-0", _line(4)), "h1:governor"),
    ]
    merged = merge_local(stored, local)
    assert [f["plan_id"] for _, f in merged] == ["p1", "p2", "p3", "p4"]  # in time order
    assert [f.get(KEPT_IN) for _, f in merged] == [None, "h1:governor", None, "h1:governor"]
    assert merged[1][0] == "1700000002000-0" and merged[3][0] == "1700000004000-0"  # no id: the id of its time
    assert merge_local(stored, []) == stored


def test_results_merge_one_per_plan_the_stores_first() -> None:
    """A result a failover erased (kept by a journal) and the plan's later answer on the new primary: one."""
    stored = [("1700000005000-0", {"plan_id": "p1", "executed": "false", "error": "store_changed", "at": "5.0"})]
    local = [
        (("1700000002000-0", {"plan_id": "p1", "executed": "true", "at": "2.0"}), "h:apply"),
        (("1700000003000-0", {"plan_id": "p2", "executed": "true", "at": "3.0"}), "h:apply"),
    ]
    merged = merge_local(stored, local, one_per_plan)
    assert [(f["plan_id"], f["executed"]) for _, f in merged] == [("p2", "true"), ("p1", "false")]
    assert len(merge_local(stored, local)) == 3  # by fields alone the two answers of p1 would both count


def test_a_plan_the_store_forgot_is_told_by_its_lines_without_an_empty_plan_step() -> None:
    plan = {"plan_id": "p1", "symbol": "BTCUSDT", "created_at": "1700000000.0", KEPT_IN: "journal"}
    audit = [("1700000001000-0", {**_line(1), KEPT_IN: "h:governor"})]
    result = ("1700000002000-0", {"plan_id": "p1", "executed": "true", "at": "1700000002.0", KEPT_IN: "h:apply"})
    events = plan_story(plan, None, audit, result, [])
    assert [e.step for e in events] == ["decision", "result"]
