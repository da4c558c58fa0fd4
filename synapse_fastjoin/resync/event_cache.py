# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Synapse's event cache against a big room's state.

Once a room leaves partial state, Synapse's own after-work reads its member
events again, each reader on its own: the member list a client asks for
(`/members`), the user directory, the room statistics, presence. The state's
events pass through Synapse's event cache (`*getEvent*`) as they are written
(the bulk writer's rows included, as Synapse's persistence leaves them there),
but the cache holds `caches.event_cache_size` events times the cache factor:
5,000 by default (10K times the default factor 0.5). With a room's state many
times that, each reader fetches and parses the whole member list from the
database again, on SQLite's one connection and on the reactor.

Measured at 50,000 members with 50 live events a second (docs/benchmarks.md,
"Synapse's event cache after a big resync"): with the default cache the
first `/members` after the resync took 13 to 15 s and the last live events
were stored 59 to 79 s after T_full; with room for 100,000 events, 2.5 to
3.4 s and 17.6 to 25.5 s (two runs), for 150 MB more memory at T_full.

The module does not resize Synapse's cache itself (memory is the admin's to
give); it says so in the log when a resync's state outgrows it.
"""

import logging
from typing import Any

logger = logging.getLogger(__name__)


def event_cache_capacity(store: Any) -> int | None:
    """How many events Synapse's event cache holds (its size with the cache
    factors applied), or None where the cache is not found."""
    cache = getattr(store, "_get_event_cache", None)
    lru = getattr(cache, "_lru_cache", cache)
    size = getattr(lru, "max_size", None)
    return size if isinstance(size, int) else None


def warn_if_state_outgrows_event_cache(store: Any, room_id: str, state_events: int) -> bool:
    """Logs a warning if a room's state has more events than Synapse's event
    cache holds. Returns whether it did."""
    capacity = event_cache_capacity(store)
    if capacity is None or state_events <= capacity:
        return False
    logger.warning(
        "Resync of %s: the room's state has %d events, and Synapse's event cache holds %d. "
        "After the resync, the member list, the user directory, room statistics and presence "
        "will each read the member events from the database again. Raise caches.event_cache_size "
        "(or its factor, caches.per_cache_factors: {\"*getEvent*\": ...}) to the size of your "
        "biggest rooms' state if memory allows (README, \"Tuning\").",
        room_id,
        state_events,
        capacity,
    )
    return True
