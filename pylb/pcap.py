"""Minimal pcap files (libpcap format, Ethernet): enough to feed DPDK's pcap PMD."""
from __future__ import annotations

import pathlib
import struct

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1


def write(path: str | pathlib.Path, frames: list[bytes], snaplen: int = 65535) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        for i, frame in enumerate(frames):
            f.write(struct.pack("<IIII", i // 1_000_000, i % 1_000_000, len(frame), len(frame)))
            f.write(frame)


def read(path: str | pathlib.Path) -> list[bytes]:
    data = pathlib.Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (too short)")
    magic = struct.unpack("<I", data[:4])[0]
    if magic in (MAGIC, 0xA1B23C4D):
        endian = "<"
    elif struct.unpack(">I", data[:4])[0] in (MAGIC, 0xA1B23C4D):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic:#x})")
    frames, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "IIII", data[off:off + 16])[2]
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames
