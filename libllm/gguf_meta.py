"""The key/value metadata of a GGUF file, read without touching its tensors.

gguf.GGUFReader builds numpy views of every array element, which takes seconds for a
262,144-token vocabulary; this walks the header once and copies out plain values: scalars as
int/float/bool/str, string arrays as lists of raw bytes (token texts need not be UTF-8), and
numeric arrays as lists.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFContents", "TensorInfo", "read_gguf", "read_metadata"]

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# GGUF value types: the struct code of each fixed-size type (standard sizes, so also the
# numpy dtype with the same byte order).
_CODES: dict[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: str, endian: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.endian = endian
        self._u32 = struct.Struct(endian + "I")
        self._u64 = struct.Struct(endian + "Q")

    def u32(self) -> int:
        (v,) = self._u32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        (v,) = self._u64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def raw_string(self) -> bytes:
        n = self.u64()
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"{self.path}: string runs past the end of the file")
        s = self.buf[self.pos : end]
        self.pos = end
        return s

    def string_array(self, count: int) -> list[bytes]:
        # The hot loop for vocabularies: local names, one unpack per element.
        buf, pos, unpack = self.buf, self.pos, self._u64.unpack_from
        if count * 8 > len(buf) - pos:  # every element has at least its 8-byte length
            raise ValueError(f"{self.path}: truncated GGUF header (a string array of {count} elements runs past the end of the file)")
        out: list[bytes] = [b""] * count
        for i in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out[i] = buf[pos : pos + n]
            pos += n
        if pos > len(buf):
            raise ValueError(f"{self.path}: string array runs past the end of the file")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.raw_string().decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            etype = self.u32()
            count = self.u64()
            if etype == _STRING:
                return self.string_array(count)
            if etype == _ARRAY:
                if count * 12 > len(self.buf) - self.pos:  # each nested array has a 12-byte head
                    raise ValueError(f"{self.path}: truncated GGUF header (an array of {count} arrays runs past the end)")
                return [self.value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(self.endian + self._code(etype))
            if count * dtype.itemsize > len(self.buf) - self.pos:
                raise ValueError(f"{self.path}: truncated GGUF header (an array of {count} values runs past the end)")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        fmt = struct.Struct(self.endian + self._code(vtype))
        (v,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v

    def _code(self, vtype: int) -> str:
        code = _CODES.get(vtype)
        if code is None:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
        return code


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory: GGUF's shape (innermost dimension first), its GGML
    type and where its data starts, in bytes from the start of the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFContents:
    """A GGUF file's metadata and tensor directory (no tensor data)."""

    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of the GGUF file at ``path`` with its value.

    Raises:
        ValueError: not a GGUF file, or a malformed header.
    """
    return _read(path, tensors=False).metadata


def read_gguf(path: str | Path) -> GGUFContents:
    """The metadata and the tensor directory of the GGUF file at ``path`` (no tensor data).

    Raises:
        ValueError: not a GGUF file, or a malformed or truncated header.
    """
    return _read(path, tensors=True)


def _read(path: str | Path, *, tensors: bool) -> GGUFContents:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        # A big-endian file has its version's bytes swapped: little-endian reads it as >= 2**16.
        (version,) = struct.unpack_from("<I", buf, 4)
        endian = "<" if version < 1 << 16 else ">"
        if tensors and endian == ">":  # metadata reads either way; tensor data would be garbage
            raise ValueError(f"{path}: a big-endian GGUF file; llmos computes with little-endian ones")
        cur = _Cursor(buf, str(path), endian)
        cur.pos = 8
        if cur.endian == ">":
            version = struct.unpack_from(">I", buf, 4)[0]
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and later)")
        num_tensors = cur.u64()
        num_kv = cur.u64()
        meta: dict[str, Any] = {}
        infos: dict[str, TensorInfo] = {}
        try:
            for _ in range(num_kv):
                key = cur.raw_string().decode("utf-8", errors="replace")
                meta[key] = cur.value(cur.u32())
            if tensors:
                for _ in range(num_tensors):
                    name = cur.raw_string().decode("utf-8", errors="replace")
                    shape = tuple(cur.u64() for _ in range(cur.u32()))
                    ggml_type = cur.u32()
                    infos[name] = TensorInfo(name, shape, ggml_type, cur.u64())
        except struct.error as e:
            raise ValueError(f"{path}: truncated GGUF header") from e
        # Tensor offsets count from the data section, which starts aligned after the header.
        align = int(meta.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise ValueError(f"{path}: general.alignment {align} is not a power of two")
        start = -(-cur.pos // align) * align
        infos = {
            n: TensorInfo(t.name, t.shape, t.ggml_type, start + t.offset) for n, t in infos.items()
        }
        return GGUFContents(meta, infos)
