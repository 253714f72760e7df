"""The store's answers that mean "not now": a ConnectionError to every caller (back off, decide nothing)."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

# READONLY: a replica (or a primary being demoted); LOADING: loading its data after a start; BUSY: a script or
# module blocks it; MASTERDOWN: a replica cut off from its primary; UNBLOCKED: a blocked read cut short (a
# demotion, the stream deleted); NOREPLICAS: min-replicas-to-write not met; TRYAGAIN/CLUSTERDOWN: a cluster
# in the middle of a change; MISCONF: it cannot persist (a failed save or AOF write) and refuses writes; OOM: it
# is full (``noeviction``) and refuses writes.
UNAVAILABLE_REPLIES = (
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "UNBLOCKED",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MISCONF",
    "OOM",
)


class StoreUnavailableReply(RedisConnectionError):  # type: ignore[misc]
    """The store answered that it cannot serve the command now (a replica, loading, busy, failing over). The
    message keeps the store's code (``NOREPLICAS Not enough good replicas to write.``)."""

    def __init__(self, message: str = "", status_code: str | None = None) -> None:
        super().__init__(f"{status_code} {message}" if status_code else message, status_code=status_code)
