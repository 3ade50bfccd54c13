"""Shared tensors: numpy arrays that live in the instance's arena, where other processes
of the same user can map the very same bytes (no copy, no pickling).

    with libllm.connect() as session:
        with session.alloc((1024, 64), np.float32) as t:
            t.array[:] = data
            # hand t.handle, t.shape and t.dtype to another process, which maps it with
            # other_session.attach(handle, shape, dtype)

Runs in the client's process. A tensor is a segment of the arena's SEGMENTS region that
the memory server allocated for this session's endpoint; what crosses to other processes
is its handle (segment id, generation), never an offset (docs/design.md, Messages).

Lifetime, the rules in one place:

- A tensor from `Session.alloc` is yours. It is freed by `free()` (or leaving its `with`
  block), when its session closes, or when your process dies (the memory server reclaims
  everything a gone endpoint owned). Dropping the Python object does not free it; the
  session keeps it until one of those.
- A tensor from `Session.attach` maps someone else's segment and holds no reference:
  its `free()` only forgets the mapping, and the owner's free (or death) ends it for
  everyone. Agree with the owner on when it is done; a handle the owner has freed is
  refused by the next `attach` (InvalidRequest), but a mapping made earlier cannot tell.
- After `free()`, `.array` raises `Closed`, and the array it gave out turns read-only, so
  a write through it fails loudly. Views and slices taken from it before (`a[1:]`, `a.T`)
  are plain numpy objects: keeping them past `free()` is the caller's responsibility
  (they still point into the arena, which stays mapped: stale data, never a crash).
- After `fork()`, the child inherits the mapping (the arena is MAP_SHARED), but the
  segments belong to the parent's endpoint: in the child `.array` raises `Closed` and
  `free()` only forgets the tensor. A child that wants the data attaches the handle
  through its own session (libllm gives it a connection of its own on first use).
- If the scheduler restarts, the session keeps its connection and the tensors stay; if
  the whole instance restarts (the kernel died), the arena is a new one and the old
  tensors are gone: `.array` raises `ServerGone` then.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from llmos.libllm import protocol as P
from llmos.microkernel.errors import Closed, InvalidRequest, LlmosError

# Fixed-size numbers only: bool, signed and unsigned ints, floats, complex. Objects would be
# pointers into one process's heap; strings and records are left out to keep it simple.
SUPPORTED_KINDS = "biufc"


def tensor_layout(shape: SupportsIndex | Sequence[SupportsIndex], dtype: npt.DTypeLike,
                  limit: int) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Check a tensor's shape and dtype; returns (shape, dtype, bytes).

    Raises:
        InvalidRequest: a dimension is not an int >= 1, the dtype is not a fixed-size
            number, or the tensor needs more than `limit` bytes (the segment region's size).
    """
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"dtype {dtype!r} is not a numpy dtype ({exc})") from None
    if dt.kind not in SUPPORTED_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise InvalidRequest(f"dtype {dt} is not supported: use a fixed-size number type "
                             "(bool, int*, uint*, float*, complex*)")
    dims: Sequence[Any] = (shape,) if not isinstance(shape, (tuple, list)) else shape
    checked = []
    for dim in dims:
        try:
            if isinstance(dim, (bool, np.bool_)):
                raise TypeError("a bool is not a dimension")
            size = operator.index(dim)
        except TypeError:
            raise InvalidRequest(f"shape {shape!r}: every dimension must be an int, got {dim!r}") from None
        if size < 1:
            raise InvalidRequest(f"shape {shape!r}: every dimension must be >= 1, got {size}")
        checked.append(size)
    nbytes = dt.itemsize
    for size in checked:
        nbytes *= size
        if nbytes > limit:
            break
    if nbytes > limit:
        raise InvalidRequest(f"shape {tuple(checked)} of {dt} needs more bytes than the instance's segment "
                             f"region holds ({limit}); use a smaller tensor, or give the instance more "
                             "([memory] segments = ... in its config)")
    return tuple(checked), dt, nbytes


def as_handle(handle: P.SegmentRef | tuple[int, int]) -> P.SegmentRef:
    """A `SegmentRef` from a SegmentRef or a (segment_id, generation) pair.

    Raises:
        InvalidRequest: anything else.
    """
    if isinstance(handle, P.SegmentRef):
        return handle
    if (isinstance(handle, tuple) and len(handle) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in handle)):
        return P.SegmentRef(handle[0], handle[1])
    raise InvalidRequest(f"handle must be a SegmentRef or a (segment_id, generation) pair, got {handle!r}")


class SharedTensor:
    """A numpy array in the instance's arena, named by a handle other processes can attach.

    Made by `Session.alloc` (yours: `free()` it, use it as a context manager, or let the
    session's close free it) or `Session.attach` (someone else's: see the module's
    lifetime rules). Attributes: `handle` (what to pass on), `shape`, `dtype`, `nbytes`,
    `is_owner`.
    """

    def __init__(self, handle: P.SegmentRef, array: np.ndarray[Any, Any], *, is_owner: bool,
                 release: Callable[[SharedTensor], None]) -> None:
        self.handle = handle
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype: np.dtype[Any] = array.dtype
        self.nbytes = int(array.nbytes)
        self.is_owner = is_owner
        self._array: np.ndarray[Any, Any] | None = array
        self._release = release
        self._pid = os.getpid()
        self._gone: LlmosError | None = None  # why it went, when not by free()

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The numpy array over the shared bytes (no copy).

        Raises:
            Closed: the tensor was freed (or its session closed), or this is a forked child
                of the process that made it (attach the handle there instead).
            ServerGone: the instance restarted since; its arena, and this tensor, are gone.
        """
        if self._pid != os.getpid():
            raise Closed(f"shared tensor {self._describe()} belongs to process {self._pid}; in a forked "
                         "child, attach its handle with the child's session")
        if self._array is None:
            if self._gone is not None:
                raise type(self._gone)(f"shared tensor {self._describe()} is gone: {self._gone}")
            raise Closed(f"shared tensor {self._describe()} was freed")
        return self._array

    @property
    def freed(self) -> bool:
        """True once `free()` ran, the session closed, or the instance restarted."""
        return self._array is None

    def free(self) -> None:
        """Give the memory back (or, for an attached tensor, forget the mapping). Idempotent.
        In a forked child, only forgets: the segment is the parent's.

        Raises:
            PeerGone, Timeout: the memory server could not be reached; the tensor stays
                usable and `free()` may be called again (closing the session frees it too).
        """
        if self._array is None:
            return
        if self._pid != os.getpid():
            self._array = None
            return
        self._release(self)

    def _mark_freed(self, gone: LlmosError | None = None) -> None:
        """The session's side of `free()`: make `.array` raise (`gone`, when given, says
        why it went without a free) and the array it gave out read-only."""
        array, self._array = self._array, None
        self._gone = gone
        if array is not None:
            array.flags.writeable = False

    def _describe(self) -> str:
        return f"({self.handle.segment_id}, {self.handle.generation})"

    def __enter__(self) -> SharedTensor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.free()
        except LlmosError:
            if exc is None:  # never hide the exception that ended the block
                raise

    def __repr__(self) -> str:
        state = "freed" if self._array is None else ("owned" if self.is_owner else "attached")
        return f"SharedTensor(handle={self._describe()}, shape={self.shape}, dtype={self.dtype}, {state})"
