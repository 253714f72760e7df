"""Lua scripts called by name: a ``Layout`` names a script's keys and arguments once; the Python side packs them
into KEYS and ARGV by name, and a prologue generated from the same layout binds them to the same names in Lua.
The scripts themselves, and why each is one script: bus/scripts.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis

T = TypeVar("T")


Slot = tuple[str, Literal["one", "optional", "list"]]


def _slot(spec: str) -> Slot:
    """``name`` (one), ``name?`` (optional), ``name*`` (a list)."""
    if spec.endswith("*"):
        return spec[:-1], "list"
    if spec.endswith("?"):
        return spec[:-1], "optional"
    return spec, "one"


@dataclass(frozen=True, slots=True)
class Layout:
    """A script's keys and arguments by name, in order. A key name ending in ``?`` is optional (left out of KEYS
    when not given: nil in Lua), one ending in ``*`` is a list (the last key name; a Lua table). An argument
    name ending in ``*`` is a list too (the last argument: a Lua table, for field/value pairs)."""

    keys: tuple[str, ...]
    args: tuple[str, ...]

    def prologue(self) -> str:
        """Lua binding every name: required and optional keys in order, then the arguments. ARGV[1] is the
        presence of the optional keys ('1' or '0' each, in order) when the script has any."""
        lines = ["local nk = 1"]
        optional = 0
        for name, kind in map(_slot, self.keys):
            if kind == "list":
                lines.append(f"local {name} = {{unpack(KEYS, nk)}}")
            elif kind == "optional":
                optional += 1
                lines.append(f"local {name} = nil")
                lines.append(
                    f"if string.sub(ARGV[1], {optional}, {optional}) == '1' then {name} = KEYS[nk]; nk = nk + 1 end"
                )
            else:
                lines.append(f"local {name} = KEYS[nk]; nk = nk + 1")
        first = 2 if optional else 1
        for n, (name, kind) in enumerate(map(_slot, self.args), start=first):
            lines.append(f"local {name} = {{unpack(ARGV, {n})}}" if kind == "list" else f"local {name} = ARGV[{n}]")
        return "\n".join(lines) + "\n"

    def pack(self, named_keys: Mapping[str, Any], named_args: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV for these names; a name missing or not in the layout is a TypeError."""
        key_slots, arg_slots = [_slot(spec) for spec in self.keys], [_slot(spec) for spec in self.args]
        _same_names("keys", [name for name, _ in key_slots], named_keys)
        _same_names("args", [name for name, _ in arg_slots], named_args)
        script_keys: list[str] = []
        present = ""
        for name, kind in key_slots:
            value = named_keys[name]
            if kind == "list":
                script_keys += list(value)
            elif kind == "optional":
                present += "1" if value else "0"
                if value:
                    script_keys.append(value)
            elif not value:
                raise TypeError(f"script key {name} is required")
            else:
                script_keys.append(value)
        args: list[Any] = [present] if any(kind == "optional" for _, kind in key_slots) else []
        for name, kind in arg_slots:
            value = named_args[name]
            args += list(value) if kind == "list" else [value]
        return script_keys, args


def _same_names(what: str, declared: list[str], given: Mapping[str, Any]) -> None:
    if set(declared) != set(given):
        missing, extra = set(declared) - set(given), set(given) - set(declared)
        raise TypeError(f"script {what}: missing {sorted(missing)}, not in the layout {sorted(extra)}")


class LuaScript:
    """One script registered on one client, called by name (redis-py reloads it on NOSCRIPT)."""

    def __init__(self, redis: aioredis.Redis, layout: Layout, body: str) -> None:
        self.layout = layout
        self._script = redis.register_script(layout.prologue() + body)

    @property
    def sha(self) -> str:
        return str(self._script.sha)

    async def __call__(
        self, named_keys: Mapping[str, Any], named_args: Mapping[str, Any], client: aioredis.Redis | None = None
    ) -> Any:
        """Run it (on ``client``, e.g. one connection held for a WAIT after it; default: the registering one)."""
        script_keys, args = self.layout.pack(named_keys, named_args)
        return await self._script(keys=script_keys, args=args, client=client)

    async def run_packed(self, script_keys: list[str], args: list[Any]) -> Any:
        return await self._script(keys=script_keys, args=args)


def one_of(allowed: tuple[T, ...], reply: str) -> T:
    for name in allowed:
        if name == reply:
            return name
    raise ValueError(f"script replied {reply!r}, not one of {allowed}")
