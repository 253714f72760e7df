"""What a decision function returns: allow or deny, and the stable reason code why."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    reason: str

    @classmethod
    def deny(cls, reason: str) -> Verdict:
        return cls(False, reason)
