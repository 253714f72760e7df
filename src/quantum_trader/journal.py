"""The local audit log: every audit, result, ledger and operator line a process writes to the store is also
appended to a file on its own host, so the trail survives what the store cannot keep (a failover erases what
the promoted replica never received; a store that comes back from an older snapshot forgets its newest lines).

One JSON object per line (``JournalRecord``), in ``<dir>/<service>.<writer>.<host>.jsonl``; a file is rotated at a size
(``.1`` the newest rotated, up to ``keep`` of them). Lines are written as they happen (each a write(2): a
``kill -9`` of the process loses none) and fsynced in batches by a background task (a power loss loses at most
the last ``fsync_ms``). Writing never raises into the service: a full disk is logged once per failure run and
the service goes on (the store still has the line; the journal is the second copy, not the first).

``read_journal`` reads every file of a directory back (rotated ones too), skipping and counting lines a crash
left torn or that are not ours; ``qt audit`` and ``qt report`` merge what it finds with the store's streams
(domain/story.py ``merge_entries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from quantum_trader.settings import Settings

SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One line: which stream the process wrote to, the entry's id when the writer learnt it, its fields."""

    stream: str
    fields: dict[str, str]
    entry_id: str = ""
    service: str = ""
    host: str = ""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


@dataclass
class Journal:
    """The journal of one process (``service`` on this host) in ``directory``."""

    directory: Path
    service: str
    max_bytes: int = 64 * 1024 * 1024
    keep: int = 10
    fsync_s: float = 0.2
    host: str = field(default_factory=socket.gethostname)
    name: str = ""  # this writer's name in the file's: one writer per file (a consumer name; default: the service)
    sync_each: bool = False  # fsync every line at once (an operator's rare actions; no batching task runs)
    _file: IO[str] | None = field(default=None, init=False, repr=False)
    _size: int = field(default=0, init=False)
    _dirty: bool = field(default=False, init=False)
    _failing: bool = field(default=False, init=False)

    @property
    def path(self) -> Path:
        """``<service>.<name>.<host>.jsonl``: the service, the writer and the host all in the name, so the
        files of several hosts copied into one directory never collide."""
        parts = (self.service, self.name or self.service, self.host)
        stem = ".".join("".join(c if c.isalnum() or c in "-_" else "_" for c in part) for part in parts)
        return self.directory / f"{stem}{SUFFIX}"

    def append(self, stream: str, fields: Mapping[str, Any], entry_id: str = "") -> bool:
        """Write one line now. Never raises: a failure is logged (once per run of failures; the store has the
        line) and the line is not written. Returns whether it was written."""
        try:
            self.append_or_raise(stream, fields, entry_id)
        except OSError as exc:
            if not self._failing:
                _log(self.service).error("the local audit log cannot be written", path=str(self.path), error=str(exc))
            self._failing = True
            return False
        self._failing = False
        return True

    def append_or_raise(self, stream: str, fields: Mapping[str, Any], entry_id: str = "") -> None:
        """Write one line now (fsynced too with ``sync_each``); an OSError when it could not be."""
        record = {
            "stream": stream,
            "id": entry_id,
            "fields": {str(k): _text(v) for k, v in fields.items()},
            "service": self.service,
            "host": self.host,
        }
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"
        handle = self._open()
        if self._size and self._size + len(line) > self.max_bytes:
            handle = self._rotate()
        handle.write(line)
        self._size += len(line)
        self._dirty = True
        if self.sync_each:
            self.sync()

    def _open(self) -> IO[str]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # line-buffered: each line is one write(2), in the kernel before append() returns
            handle = open(self.path, "a+", buffering=1, encoding="ascii")  # noqa: SIM115 (closed by close())
            self._size = handle.tell()
            if self._size:  # a line a crash cut short must not swallow the next one: end it first
                handle.seek(self._size - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")
                    self._size += 1
            self._file = handle
        return self._file

    def _rotate(self) -> IO[str]:
        """The full file becomes ``.1`` (``.1`` becomes ``.2`` …, the oldest beyond ``keep`` is removed). A
        rotation that fails is logged and the file goes on growing (until the next ``max_bytes``): a line is
        worth more than the size limit."""
        self.close()
        try:
            self.path.with_name(f"{self.path.name}.{self.keep}").unlink(missing_ok=True)
            for n in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        except OSError as exc:
            _log(self.service).error("the local audit log cannot be rotated", path=str(self.path), error=str(exc))
            handle = self._open()
            self._size = 0  # try again after another max_bytes, not at every line
            return handle
        return self._open()

    def sync(self) -> None:
        """fsync what was written (in the caller's thread)."""
        if self._file is not None and self._dirty:
            self._dirty = False
            os.fsync(self._file.fileno())

    async def sync_forever(self) -> None:
        """The batch fsync: every ``fsync_s`` when something was written, in a thread (an fsync can take
        milliseconds; the service's loop goes on). A duplicate descriptor keeps the file open for the thread
        even if a rotation closes it meanwhile. A failed fsync is tried again next round, logged once per run."""
        failing = False
        while True:
            await asyncio.sleep(self.fsync_s)
            if self._file is None or not self._dirty:
                continue
            self._dirty = False
            try:
                fd = os.dup(self._file.fileno())
            except (OSError, ValueError):  # closed by a rotation between the check and the dup: next round
                self._dirty = True
                continue
            try:
                await asyncio.to_thread(_fsync_and_close, fd)
                failing = False
            except OSError as exc:
                self._dirty = True
                if not failing:
                    _log(self.service).error(
                        "the local audit log cannot be synced", path=str(self.path), error=str(exc)
                    )
                failing = True

    def close(self) -> None:
        """Sync and close; never raises (a service stopping must still say so to the store)."""
        if self._file is not None:
            try:
                self.sync()
            except OSError as exc:
                _log(self.service).error("the local audit log cannot be synced", path=str(self.path), error=str(exc))
            finally:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None


def open_journal(settings: Settings, service: str, name: str = "", *, sync_each: bool = False) -> Journal:
    """The journal of ``service`` in this process, as the settings say, under the writer ``name`` (the
    instance's consumer name: two instances on one host write two files). The file opens at the first line."""
    j = settings.journal
    size = j.max_mb * 1024 * 1024
    return Journal(
        settings.journal_dir,
        service,
        max_bytes=size,
        keep=j.keep,
        fsync_s=j.fsync_ms / 1000,
        name=name,
        sync_each=sync_each,
    )


def _log(service: str) -> Any:
    return structlog.get_logger(service)  # logs.py is a sibling of this layer: structlog itself, as configured


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class JournalRead:
    records: list[JournalRecord] = field(default_factory=list)
    unreadable: dict[str, int] = field(default_factory=dict)  # file name -> lines skipped (torn, not ours)


def journal_files(directory: Path) -> Iterator[Path]:
    """Each writer's files oldest first: ``.N`` … ``.1``, then the one being written."""

    def order(path: Path) -> tuple[str, int]:
        stem, _, rotated = path.name.partition(SUFFIX)
        number = rotated.removeprefix(".")
        return stem, -int(number) if number.isdigit() else 0

    if directory.is_dir():
        yield from sorted((p for p in directory.iterdir() if p.is_file() and SUFFIX in p.name), key=order)


def read_journal(directory: Path) -> JournalRead:
    """Every record of every journal file in ``directory``; a missing directory reads as empty."""
    read = JournalRead()
    for path in journal_files(directory):
        skipped = 0
        try:
            with open(path, "rb") as handle:
                for raw in handle:
                    record = _parse(raw)
                    if record is None:
                        skipped += 1
                    else:
                        read.records.append(record)
        except OSError as exc:  # not ours to read (another service's 0700 directory), or rotated away meanwhile
            read.unreadable[f"{path.name} ({exc.strerror or exc})"] = 1
            continue
        if skipped:
            read.unreadable[path.name] = skipped
    return read


def _parse(raw: bytes) -> JournalRecord | None:
    """A line as written by ``Journal.append``, or None (a line a crash cut short, or anything else)."""
    try:
        data = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(data, dict):
        return None
    fields, stream = data.get("fields"), data.get("stream")
    if not isinstance(stream, str) or not isinstance(fields, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        return None
    return JournalRecord(
        stream=stream,
        fields=fields,
        entry_id=str(data.get("id") or ""),
        service=str(data.get("service") or ""),
        host=str(data.get("host") or ""),
    )
