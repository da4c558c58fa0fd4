"""Which of a generated room's other servers are alive, and how the dead ones
fail: the federation a joining server meets (see `FakeResident`'s `world`).

A real big room's server list is mostly dead servers: names that no longer
resolve (slowly, once their DNS is gone), hosts that refuse or never answer,
servers that answer 5xx or 404 to everything, servers that have some events and
not others. `plan_world` spreads a fraction of a room's servers over such kinds,
deterministically, so stock and patched Synapse meet the same federation.
"""

import random
from typing import Sequence

from tests.harness.fakehs.room import RoomSpec
from tests.harness.fakehs.server import DEAD_KINDS, WORLD_KINDS


def plan_world(
    spec: RoomSpec,
    dead_fraction: float,
    kinds: Sequence[str] = DEAD_KINDS,
    overrides: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Every server of the room (but the residents we play, which are always
    alive) mapped to `live` or a dead kind.

    Args:
        dead_fraction: share of those servers that are dead (0 to 1, rounded
            to the nearest count).
        kinds: dead kinds to use, given out in turn over the dead servers.
        overrides: name -> kind, applied last (e.g. the one live server at the
            end of the list).
    """
    if not 0.0 <= dead_fraction <= 1.0:
        raise ValueError(f"dead_fraction must be between 0 and 1, not {dead_fraction}")
    bad = [k for k in kinds if k not in WORLD_KINDS or k == "live"]
    if bad or not kinds:
        raise ValueError(f"dead kinds must be some of {DEAD_KINDS}, not {list(kinds)}")
    names = spec.server_names()
    order = list(names)
    random.Random(f"{spec.cache_name}-{seed}").shuffle(order)
    dead = order[: round(dead_fraction * len(names))]
    world = {name: "live" for name in names}
    for i, name in enumerate(sorted(dead)):
        world[name] = kinds[i % len(kinds)]
    for name, kind in (overrides or {}).items():
        if kind not in WORLD_KINDS:
            raise ValueError(f"{name}: unknown kind {kind!r}; use one of {WORLD_KINDS}")
        world[name] = kind
    return world
