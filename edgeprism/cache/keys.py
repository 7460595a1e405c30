"""The typed key of one sub-expert unit."""

from __future__ import annotations

from typing import NamedTuple


class SubExpertKey(NamedTuple):
    """One unit of expert weights: group `group` of expert `expert` in decoder layer `layer`.

    A NamedTuple rather than a dataclass: keys are hashed millions of times on the decode path and
    tuple hashing is the cheapest Python offers.
    """

    layer: int
    expert: int
    group: int
