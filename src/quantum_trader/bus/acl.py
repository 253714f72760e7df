"""Least privilege in the store: one Redis/Valkey ACL user per service, allowed the keys and commands its job
needs and nothing else.

The point is that a compromised or buggy service cannot do another's job: the brain's account cannot write a
Governor permit (nor the Governor's a P3.3 one), nothing but Apply can consume permits or publish results, and
no service account can run FLUSHALL, CONFIG, DEBUG, KEYS, SHUTDOWN or ACL. Redis >= 7 selectors: ``%R~`` read
only, ``%W~`` write only, ``~`` both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantum_trader.bus import keys
from quantum_trader.secrets import ACL_ROLES

# Commands every service account needs: the data types the chain uses, scripts (EVALSHA of the bus scripts),
# and connection housekeeping. Then everything dangerous or administrative is taken away again.
BASE_COMMANDS = (
    "+@read",
    "+@write",
    "+@stream",
    "+@hash",
    "+@string",
    "+@sortedset",
    "+@keyspace",
    "+@connection",
    "+@transaction",
    "-@dangerous",
    "-@admin",
    "-@pubsub",
    "+client|setinfo",
    "+client|setname",
    # scripts: run the bus's (redis-py loads one on NOSCRIPT); not SCRIPT FLUSH/KILL, not FUNCTION
    "+evalsha",
    "+eval",
    "+script|load",
    "+script|exists",
)

GOVERNOR_PERMITS = "quantum:permit:[0-9a-f]*"  # plan ids are hex; "quantum:permit:p33:…" does not match
P33_PERMITS = "quantum:permit:p33:*"


# Consuming a stream through a consumer group writes to it (XREADGROUP moves the pending list, XACK clears it),
# so a plain key rule would also allow XADD. A selector limited to these commands lets a service consume a
# stream it must never publish into: the brain reads results but cannot forge one.
CONSUME_COMMANDS = (
    "+xreadgroup",
    "+xack",
    "+xclaim",
    "+xautoclaim",
    "+xpending",
    "+xinfo",
    "+xrange",
    "+xrevrange",
    "+xlen",
    "+xgroup|create",
)


@dataclass(frozen=True, slots=True)
class AclUser:
    name: str
    keys: tuple[str, ...]  # ACL key rules: "~pat" read/write, "%R~pat" read only, "%W~pat" write only
    commands: tuple[str, ...] = BASE_COMMANDS
    consumes: tuple[str, ...] = ()  # streams it may only consume (read through its group, ack, claim)

    def rules(self) -> list[str]:
        selectors = [f"({' '.join((f'~{stream}', *CONSUME_COMMANDS))})" for stream in self.consumes]
        if self.consumes:
            selectors.append(self.script_selector())
        return ["resetchannels", *self.keys, *self.commands, *selectors]

    def script_selector(self) -> str:
        """The bus scripts declare every key they touch, the consumed stream they acknowledge in too, and a
        script's keys are checked read-write (the server cannot know what it does with them). So a script that
        acknowledges runs under this selector: every key the user may write, plus its consumed streams, for
        EVALSHA/EVAL only. Inside the script each command is checked again on its own: an XADD into a consumed
        stream finds no rule that allows it (not the user's keys, not the consume selector's commands, not this
        one's), so a service still cannot publish into the stream it consumes."""
        writable = [rule for rule in self.keys if rule.startswith("~")]
        consumed = [f"~{stream}" for stream in self.consumes]
        return f"({' '.join((*writable, *consumed, '+evalsha', '+eval'))})"


def _rw(*patterns: str) -> tuple[str, ...]:
    return tuple(f"~{p}" for p in patterns)


def _r(*patterns: str) -> tuple[str, ...]:
    return tuple(f"%R~{p}" for p in patterns)


USERS: dict[str, AclUser] = {
    "apply": AclUser(
        "qt-apply",
        _rw(
            keys.PROPOSAL_DLQ,
            keys.AUDIT_DLQ,
            keys.PLAN_STREAM,
            keys.RESULT_STREAM,
            keys.AUDIT_STREAM,
            "quantum:permit:*",  # verifies and consumes both permits (the consume script deletes them)
            "quantum:apply:*",
            "quantum:plan:*",
            "quantum:health:apply:*",
            keys.SERVICE_EVENTS_STREAM,
        )
        + _r("quantum:position:snapshot:*"),  # a plan's position: P3.3's snapshot (services/apply/position_reads.py)
        commands=(*BASE_COMMANDS, "+info"),  # which store instance it talks to (bus/identity.py)
        consumes=(keys.PROPOSAL_STREAM,),
    ),
    "governor": AclUser(
        "qt-governor",
        _rw(
            keys.PLAN_DLQ,
            keys.AUDIT_STREAM,
            GOVERNOR_PERMITS,
            "quantum:decided:governor:*",
            "quantum:governor:grants*",
            "quantum:health:governor:*",
            keys.SERVICE_EVENTS_STREAM,
        )
        + _r(keys.KILL_SWITCH, keys.GOVERNOR_MODE, "quantum:position:snapshot:*"),
        consumes=(keys.PLAN_STREAM,),
    ),
    "brain": AclUser(
        "qt-brain",
        _rw(
            keys.PLAN_DLQ,
            keys.RESULT_DLQ,
            keys.AUDIT_STREAM,
            keys.LEDGER_AUDIT_STREAM,
            P33_PERMITS,
            "quantum:decided:p33:*",
            "quantum:position:*",
            "quantum:p33:*",
            "quantum:health:brain:*",
            keys.SERVICE_EVENTS_STREAM,
        )
        + _r("quantum:apply:result:*"),  # whether a plan's result is out (a mark about to be released)
        commands=(*BASE_COMMANDS, "+info"),  # which store instance it talks to: another one means reconcile
        consumes=(keys.PLAN_STREAM, keys.RESULT_STREAM),
    ),
    "operator": AclUser(  # the `qt` commands: propose, permit grant/deny, kill switch, mode, status, proof
        "qt-operator",
        commands=(*BASE_COMMANDS, "+role"),  # qt status: each replica's lag behind the primary
        keys=_r("quantum:*")
        + _rw(
            keys.PROPOSAL_STREAM,
            GOVERNOR_PERMITS,
            "quantum:decided:governor:*",
            keys.AUDIT_STREAM,
            keys.KILL_SWITCH,
            keys.GOVERNOR_MODE,
            "quantum:governor:grants*",
            keys.OPS_AUDIT_STREAM,
            keys.RECONCILE_REQUEST,
        ),
    ),
    "web": AclUser(  # the dashboard: reads everything, writes only the kill switch and its audit line
        "qt-web",
        _r("quantum:*") + _rw(keys.KILL_SWITCH, keys.OPS_AUDIT_STREAM),
        (*BASE_COMMANDS, "+role"),  # the store's nodes and each replica's lag
    ),
}


ADMIN = AclUser("qt-admin", ("~*",), ("+@all",))  # what `qt up` itself uses to set the store up; no service

# The store's own accounts in a high-availability set (Valkey's and Redis's documented minimum): a replica
# authenticates to its primary (masteruser/masterauth) to replicate, and a Sentinel to every node to watch it,
# promote a replica (REPLICAOF), and rewrite the configuration of the nodes it reconfigures. No keys.
STORE_USERS: dict[str, AclUser] = {
    "replica": AclUser("qt-replica", (), ("+psync", "+replconf", "+ping")),
    "sentinel": AclUser(
        "qt-sentinel",
        ("allchannels",),
        (
            "+multi",
            "+slaveof",
            "+replicaof",
            "+ping",
            "+exec",
            "+subscribe",
            "+config|rewrite",
            "+role",
            "+publish",
            "+info",
            "+client|setname",
            "+client|kill",
            "+script|kill",
        ),
    ),
}


# Subcommands a Redis before 7.2 does not know (Debian 12's redis-server is 7.0): an ACL rule naming one is an
# error there, in ACL SETUSER and in an aclfile alike, so such a store gets the users without them.
NEWER_THAN_7_0 = frozenset({"client|setinfo"})


def without(rules: list[str], unknown: frozenset[str]) -> list[str]:
    """``rules`` minus every ``+name`` / ``-name`` of a command in ``unknown``, selectors included."""

    def keep(token: str) -> bool:
        return not (token[:1] in ("+", "-") and token[1:].lower() in unknown)

    kept = []
    for rule in rules:
        if rule.startswith("(") and rule.endswith(")"):
            kept.append("(" + " ".join(t for t in rule[1:-1].split() if keep(t)) + ")")
        elif keep(rule):
            kept.append(rule)
    return kept


def setuser_args(user: AclUser, password: str, unknown: frozenset[str] = frozenset()) -> list[str]:
    """Arguments of ``ACL SETUSER`` that define ``user`` from scratch (reset first: no stale rights remain),
    without rules for the commands in ``unknown`` (ones the server does not have)."""
    return ["ACL", "SETUSER", user.name, "reset", "on", f">{password}", *without(user.rules(), unknown)]


def acl_file(passwords: dict[str, str], *, with_admin: bool = False, before_7_2: bool = False) -> str:
    """The users as an ACL file (``aclfile`` in valkey.conf / redis.conf), passwords as SHA-256 hashes.

    ``with_admin`` adds the admin user and restricts ``default`` (no password) to PING, which is what
    `qt up` loads into the embedded store: the users survive a store restart, and an anonymous client can
    learn that the server is up and nothing else. ``before_7_2``: for a Redis 7.0 or 7.1, which refuses a
    file that names a subcommand it does not have (``NEWER_THAN_7_0``).
    """
    unknown = NEWER_THAN_7_0 if before_7_2 else frozenset()
    import hashlib

    def digest(role: str) -> str:
        return "#" + hashlib.sha256(passwords[role].encode()).hexdigest()

    lines = [
        " ".join(["user", user.name, "on", digest(role), *without(user.rules(), unknown)])
        for role, user in (*USERS.items(), *STORE_USERS.items())
    ]
    if with_admin:
        lines.append(" ".join(["user", ADMIN.name, "on", digest("admin"), "allchannels", *ADMIN.keys, *ADMIN.commands]))
        lines.append("user default on nopass resetchannels -@all +ping")
    return "\n".join(lines) + "\n"


async def unknown_commands(admin: Any) -> frozenset[str]:
    """Which of the (sub)commands the rules name this server does not have: ``NEWER_THAN_7_0`` on a Redis
    before 7.2 (a Valkey has them all)."""
    info = await admin.info("server")
    if info.get("valkey_version"):
        return frozenset()
    major, minor, *_ = (int(part) for part in f"{info.get('redis_version', '0')}.0.0".split(".")[:2])
    return NEWER_THAN_7_0 if (major, minor) < (7, 2) else frozenset()


async def apply_acl(admin: Any, passwords: dict[str, str], *, disable_default: bool) -> None:
    """Create (or redefine) every service user and the admin user on the store ``admin`` is connected to.

    ``disable_default`` switches the password-less ``default`` user off: from then on only these users can
    connect. ``admin`` must be able to run ACL (the default user of a fresh server, or an admin).
    """
    unknown = await unknown_commands(admin)
    for role, user in (*USERS.items(), *STORE_USERS.items()):
        await admin.execute_command(*setuser_args(user, passwords[role], unknown))
    await admin.execute_command(
        "ACL",
        "SETUSER",
        ADMIN.name,
        "reset",
        "on",
        f">{passwords['admin']}",
        "allchannels",
        *ADMIN.keys,
        *ADMIN.commands,
    )
    if disable_default:
        await admin.execute_command("ACL", "SETUSER", "default", "off")


ROLES = ACL_ROLES  # every role has a password file (secrets.py); the users above are these roles but admin
