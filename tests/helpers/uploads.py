"""Uploads that test the app's limits."""

import struct
import zlib
from pathlib import Path


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height and whose pixel data is missing (decoding it would fail): what a
    few-hundred-KB upload of a huge, flat image looks like to anything that reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
