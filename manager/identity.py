"""What a POD5 file says about itself: complete or not, and its file identifier.

A POD5 file is framed by an 8-byte signature; the same 16-byte section marker (a
UUID) follows the first signature and ends every section. Its footer is written
last, when the writer closes the file:

    ... | "FOOTER\\0\\0" | footer (flatbuffer) | footer length (int64 LE) | section marker | signature

The footer's first field is the file identifier, a UUID string (what
``pod5.Reader(path).file_identifier`` returns). Reading it here costs one open and
two small reads, and keeps the manager free of the pod5 library (and its numpy and
pyarrow): only this frame and the flatbuffer's string field are decoded.

A file that starts with the signature but has no valid footer is a POD5 still being
written (INCOMPLETE). A file that does not start with the signature cannot be checked
(UNKNOWN): readiness falls back to the settle timer and identity to path and size.
"""
from __future__ import annotations

import enum
import os
import struct
import uuid
from dataclasses import dataclass

SIGNATURE = b"\x8bPOD\r\n\x1a\n"
FOOTER_MAGIC = b"FOOTER\x00\x00"
_MARKER = 16
_TRAILER = 8 + _MARKER + len(SIGNATURE)  # footer length, section marker, signature
MAX_FOOTER = 1 << 20


class Kind(str, enum.Enum):
    COMPLETE = "COMPLETE"        # valid footer, identifier read
    INCOMPLETE = "INCOMPLETE"    # a POD5 without a valid footer yet (still being written)
    UNKNOWN = "UNKNOWN"          # not recognisably POD5, or unreadable: cannot be checked


@dataclass(frozen=True)
class Examined:
    kind: Kind
    identifier: str = ""         # the file identifier (lower-case UUID) when COMPLETE
    why: str = ""


def examine(path: str | os.PathLike[str]) -> Examined:
    """Look at the head and the tail of path; never raises for what is on disk."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SIGNATURE) + _MARKER)
            if not head:
                return Examined(Kind.UNKNOWN, why="empty: the settle timer decides")
            if len(head) < len(SIGNATURE) or head[:len(SIGNATURE)] != SIGNATURE:
                if len(head) < len(SIGNATURE) and SIGNATURE.startswith(head):
                    return Examined(Kind.INCOMPLETE, why="shorter than a POD5 signature")
                return Examined(Kind.UNKNOWN, why="no POD5 signature")
            if len(head) < len(SIGNATURE) + _MARKER:
                return Examined(Kind.INCOMPLETE, why="no section marker yet")
            marker = head[len(SIGNATURE):]
            size = fh.seek(0, os.SEEK_END)
            if size < len(head) + len(FOOTER_MAGIC) + _TRAILER:
                return Examined(Kind.INCOMPLETE, why="no footer yet")
            fh.seek(size - _TRAILER)
            trailer = fh.read(_TRAILER)
            (length,) = struct.unpack_from("<q", trailer, 0)
            if trailer[8:8 + _MARKER] != marker or trailer[8 + _MARKER:] != SIGNATURE:
                return Examined(Kind.INCOMPLETE, why="no footer yet (file does not end in one)")
            start = size - _TRAILER - length - len(FOOTER_MAGIC)
            if not 0 < length <= MAX_FOOTER or start < len(head):
                return Examined(Kind.INCOMPLETE, why=f"footer length {length} is not valid")
            fh.seek(start)
            block = fh.read(len(FOOTER_MAGIC) + length)
    except OSError as exc:
        return Examined(Kind.UNKNOWN, why=f"cannot read: {exc.strerror or exc}")
    if block[:len(FOOTER_MAGIC)] != FOOTER_MAGIC:
        return Examined(Kind.INCOMPLETE, why="footer magic missing")
    try:
        identifier = str(uuid.UUID(_first_string(block[len(FOOTER_MAGIC):])))
    except (ValueError, struct.error, IndexError) as exc:
        return Examined(Kind.INCOMPLETE, why=f"footer has no readable file identifier: {exc}")
    return Examined(Kind.COMPLETE, identifier)


def _first_string(buf: bytes) -> str:
    """Field 0 of a flatbuffer's root table, as a string (the Footer's file_identifier)."""
    (table,) = struct.unpack_from("<I", buf, 0)
    (vtable_back,) = struct.unpack_from("<i", buf, table)
    vtable = table - vtable_back
    vtable_size, _ = struct.unpack_from("<HH", buf, vtable)
    if vtable_size < 6:
        raise ValueError("footer table has no fields")
    (field,) = struct.unpack_from("<H", buf, vtable + 4)
    if field == 0:
        raise ValueError("file_identifier is not set")
    at = table + field
    (rel,) = struct.unpack_from("<I", buf, at)
    (n,) = struct.unpack_from("<I", buf, at + rel)
    raw = buf[at + rel + 4:at + rel + 4 + n]
    if len(raw) != n:
        raise ValueError("file_identifier runs past the footer")
    return raw.decode("ascii")
