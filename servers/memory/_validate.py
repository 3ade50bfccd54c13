"""Checks every number that arrives in a memory request: ids, counts, sizes.

Runs inside the memory server. Turns bad input into InvalidRequest with a message that
names the field and the allowed range; never changes any state itself.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Final

from llmos.microkernel.errors import InvalidRequest

U32_MAX: Final = (1 << 32) - 1


def as_int(value: object, what: str) -> int:
    """`value` as a Python int; bools and non-integers (floats, strings) are refused."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidRequest(
            f"{what} must be an integer, got {type(value).__name__} {value!r}"
        ) from None


def as_in_range(value: object, what: str, low: int, high: int) -> int:
    """`value` as an int in [low, high]."""
    number = as_int(value, what)
    if not low <= number <= high:
        raise InvalidRequest(f"{what} must be in [{low}, {high}], got {number}")
    return number


def as_endpoint_id(value: object, what: str = "endpoint id") -> int:
    return as_in_range(value, what, 0, U32_MAX)


def as_ids(values: Iterable[object], what: str, num_ids: int) -> list[int]:
    """A batch of ids, each in [0, num_ids)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidRequest(f"{what} must be a sequence of integers, got {type(values).__name__}")
    values = list(values)
    # Fast path for the common case, a list of plain ints: one range check for the batch.
    if all(type(v) is int for v in values):
        ints: list[int] = values  # type: ignore[assignment]
        if not ints or (num_ids and min(ints) >= 0 and max(ints) < num_ids):
            return ints
    if num_ids == 0:
        ids = [as_int(v, what) for v in values]
        if ids:
            raise InvalidRequest(f"{what} {ids[0]} does not exist: the table is empty")
        return ids
    return [as_in_range(v, what, 0, num_ids - 1) for v in values]


def as_distinct_ids(values: Iterable[object], what: str, num_ids: int) -> list[int]:
    ids = as_ids(values, what, num_ids)
    if len(set(ids)) != len(ids):
        raise InvalidRequest(f"{what} must not repeat an id, got {ids}")
    return ids
