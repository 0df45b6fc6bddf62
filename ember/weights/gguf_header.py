"""GGUF header parser: key/value metadata and the tensor table, read straight from the mapped file.

`gguf.GGUFReader` builds a numpy view per vocabulary string (about 5 s for SmolLM2's 49k tokens,
22 s for Gemma's 262k); parsing the header here takes 0.1-0.3 s. gguf-py still provides the
quantization constants and the reference dequantizers.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.errors import ModelFormatError

# GGUF value types -> struct format (scalars) / numpy dtype (arrays); 8 = string, 9 = array.
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9



class _Cursor:
    """Sequential little/big-endian reader over the mapped file, bounds-checked."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf, self.pos, self.path, self.end = buf, 0, path, "<"

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFormatError(
                f"{self.path}: GGUF header is truncated or corrupt (read past end of file)"
            )

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (v,) = struct.unpack_from(self.end + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, count: int) -> list[str]:
        # Hot loop for vocabularies: locals instead of attribute lookups, one bounds check per item.
        buf, pos, size, unpack = self.buf, self.pos, len(self.buf), struct.Struct(self.end + "Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8)
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n)
            raw = buf[pos : pos + n]
            pos += n
            try:
                append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                append(raw.decode("utf-8", errors="replace"))
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype == _STRING:
                return self.strings(count)
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            fmt = _FMT.get(etype)
            if fmt is None:
                raise ModelFormatError(f"{self.path}: unknown GGUF array element type {etype}")
            dtype = np.dtype(self.end + fmt)
            self.need(count * dtype.itemsize)
            # Slicing copies out of the mmap so no buffer export outlives the mapping.
            raw = self.buf[self.pos : self.pos + count * dtype.itemsize]
            self.pos += count * dtype.itemsize
            return np.frombuffer(raw, dtype=dtype).tolist()
        fmt = _FMT.get(vtype)
        if fmt is None:
            raise ModelFormatError(f"{self.path}: unknown GGUF value type {vtype}")
        return self.scalar(fmt)


def read_gguf_metadata(path: str | os.PathLike[str], reader: Any = None) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (lists for arrays).

    Also returns the pseudo-keys GGUF.version / GGUF.tensor_count / GGUF.kv_count (as gguf-py does).
    Only the header is read; tensor data is never touched. `reader` (a gguf.GGUFReader) is accepted
    for compatibility but not used: parsing the header directly is much faster than its fields.
    """
    del reader
    p = str(path)
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(_Cursor(buf, p))
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise ModelFormatError(f"{p}: cannot read GGUF file: {e}") from e


def _parse_header(cur: _Cursor) -> dict[str, Any]:
    cur.need(4)
    if cur.buf[:4] != b"GGUF":
        raise ModelFormatError(f"{cur.path}: not a GGUF file (bad magic {bytes(cur.buf[:4])!r})")
    cur.pos = 4
    version = cur.scalar("I")
    if version & 0xFFFF == 0:  # a big-endian file reads as a huge little-endian number
        cur.end, cur.pos = ">", 4
        version = cur.scalar("I")
    if version < 2:
        raise ModelFormatError(
            f"{cur.path}: GGUF version {version} is too old; re-convert with current llama.cpp"
        )
    md: dict[str, Any] = {"GGUF.version": version}
    md["GGUF.tensor_count"] = cur.scalar("Q")
    kv_count = md["GGUF.kv_count"] = cur.scalar("Q")
    for _ in range(kv_count):
        key = cur.string()
        md[key] = cur.value(cur.scalar("I"))
    return md


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) dimension first
    type_id: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file


def read_gguf_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor table of a GGUF file; tensor data is not read."""
    p = str(path)
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, p)
            md = _parse_header(cur)
            infos = []
            for _ in range(md["GGUF.tensor_count"]):
                name = cur.string()
                dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
                infos.append(TensorInfo(name, dims, cur.scalar("I"), cur.scalar("Q")))
            align = int(md.get("general.alignment", 32))
            start = -(-cur.pos // align) * align
            for t in infos:
                t.offset += start
            return md, infos
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise ModelFormatError(f"{p}: cannot read GGUF file: {e}") from e
