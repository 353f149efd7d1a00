"""The 64-byte header of a TensorRT-RTX engine file, read without TensorRT or a GPU.

Layout measured on TensorRT-RTX 1.7.1.116 (engines built for each compute capability alone and compared):

    0   4  magic b"vtrt"
    16  8  engine size in bytes (little-endian), the whole file
    24  4  backend version bytes: major, minor, patch, build (1, 7, 1, 116)
    28  4  b"vtrt" again
    32  8  compute-capability bit mask: bit 1 = 8.0, 2 = 8.6, 3 = 8.9, 4 = 12.0, 5 = 12.1
           (the default target set is 0x7e: those five and bit 6, whose meaning is not known)

Other engines (full TensorRT) have a different header; `read_header` then says it is not recognized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

HEADER_BYTES = 64
MAGIC = b"vtrt"
CC_BITS = {0: "7.5", 1: "8.0", 2: "8.6", 3: "8.9", 4: "12.0", 5: "12.1"}  # bit 0 by position, not measured


@dataclass(frozen=True)
class EngineHeader:
    recognized: bool
    size: int = 0  # as recorded in the header
    version: str = ""
    cc: list[str] = field(default_factory=list)
    unknown_cc_bits: list[int] = field(default_factory=list)
    note: str = ""


def parse_header(data: bytes) -> EngineHeader:
    if len(data) < HEADER_BYTES or data[:4] != MAGIC or data[28:32] != MAGIC:
        return EngineHeader(False, note="not a TensorRT-RTX engine header (full TensorRT or another version)")
    size = int.from_bytes(data[16:24], "little")
    version = ".".join(str(b) for b in data[24:28])
    mask = int.from_bytes(data[32:40], "little")
    bits = [b for b in range(64) if mask >> b & 1]
    return EngineHeader(
        True, size, version, [CC_BITS[b] for b in bits if b in CC_BITS], [b for b in bits if b not in CC_BITS]
    )


def read_header(path: Path) -> EngineHeader:
    with open(path, "rb") as f:
        return parse_header(f.read(HEADER_BYTES))
