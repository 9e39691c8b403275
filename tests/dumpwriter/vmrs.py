"""Write Hyper-V ``.vmrs`` saved states from the layout volatility3's Hyper-V layer reads
(pull request #1969, ``volatility3/framework/layers/vmrs.py``: ``HEADER_STRUCT``,
``_parse_object_tables``, ``_parse_key_entries``, ``_build_ram_blocks``,
``_decode_ram_block_entry``), and pages compressed in plain LZ77 ([MS-XCA] 2.4) by a minimal
encoder written from the spec's rules (one match after a run of literals).

No Hyper-V runs here, and volatility3's sample files are not in a public test corpus: these
files are built from those published facts only.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["END", "explicit", "fill", "fills", "lz77_compress", "lz77_periodic", "make_vmrs",
           "page_token"]

SIGNATURE = 0x01282014
HEADER = struct.Struct("<IIHI8sI8sQI")
OBJECT_ENTRY = struct.Struct("<BIQIB")
PS = 4096
BLOCK = 1 << 20
END = struct.pack("<I", 0xFFFFFFFF)


def fill(value: int) -> bytes:
    """One 4 KiB page of ``value`` (8 bytes, little-endian) repeated: FILL_SINGLE."""
    return struct.pack("<IQ", 0xFFFFFFFE, value)


def fills(value: int, count: int) -> bytes:
    """``count`` pages of ``value``: FILL_MULTI."""
    return struct.pack("<IQI", 0xFFFFFFFD, value, count)


def page_token(stored: bytes) -> bytes:
    """One page's bytes: raw when 4096 long, compressed otherwise."""
    return struct.pack("<I", len(stored)) + stored


def explicit(out_len: int, stored: bytes) -> bytes:
    """EXPLICIT: ``out_len`` bytes of memory from ``stored``."""
    return struct.pack("<III", 0xFFFFFFFC, out_len, len(stored)) + stored


def lz77_periodic(data: bytes, period: int) -> bytes:
    """``data`` (which repeats every ``period`` < 32 bytes) as plain LZ77: ``period``
    literals, then one match ``period`` bytes back for the rest ([MS-XCA] 2.3 rules)."""
    assert 0 < period < 32 and len(data) > period + 3
    assert all(data[i] == data[i % period] for i in range(len(data)))
    rest = len(data) - period - 3  # the match length minus 3
    flags = (1 << (32 - period)) - 1  # period literal bits (0), then 1s: the match and the end
    out = struct.pack("<I", flags) + data[:period]
    token = (period - 1) << 3
    if rest < 7:
        return out + struct.pack("<H", token | rest)
    out += struct.pack("<H", token | 7)
    rest -= 7
    if rest < 15:
        return out + bytes([rest])
    out += bytes([15])
    rest -= 15
    if rest < 255:
        return out + bytes([rest])
    return out + bytes([255]) + struct.pack("<H", rest + 15 + 7)


def lz77_compress(data: bytes, *, max_length: int = 1 << 20, candidates: int = 8) -> bytes:
    """``data`` as plain LZ77, from the compression pseudo-code of [MS-XCA] 2.3.4: 32 flags a
    word (0 a literal, 1 a match), matches of 3 or more bytes up to 8,192 back (greedy, the
    longest of the last ``candidates`` places its first 3 bytes occurred, overlapping forward
    allowed, at most ``max_length`` long), their length past 3 in the token's low 3 bits, then
    a shared nibble (the low one of the byte the first such match adds, the high one for the
    next), a byte, then 255 and a u16 or 0 and a u32 of the length minus 3 plus 22; the last
    flag word's unused bits set. Written apart from both decoders, for the tests to check
    them against."""
    out = bytearray()
    flags, nflags, flag_at = 0, 0, 0
    out += bytes(4)
    half = -1
    recent: dict[bytes, list[int]] = {}

    def flag(bit: int) -> None:  # before the item it flags
        nonlocal flags, nflags, flag_at
        if nflags == 32:
            struct.pack_into("<I", out, flag_at, flags)
            flags, nflags, flag_at = 0, 0, len(out)
            out.extend(bytes(4))
        flags = (flags << 1) | bit
        nflags += 1

    i = 0
    while i < len(data):
        best, best_at = 0, 0
        for at in reversed(recent.get(data[i : i + 3], [])):
            if i - at > 8192:
                break
            n = 0
            while i + n < len(data) and n < max_length and data[at + n] == data[i + n]:
                n += 1
            if n > best:
                best, best_at = n, at
        if best < 3:
            flag(0)
            out.append(data[i])
            step = 1
        else:
            flag(1)
            extra = best - 3
            token = (i - best_at - 1) << 3
            out += struct.pack("<H", token | min(extra, 7))
            if extra >= 7:
                extra -= 7
                nibble = min(extra, 15)
                if half < 0:
                    half = len(out)
                    out.append(nibble)
                else:
                    out[half] |= nibble << 4
                    half = -1
                if extra >= 15:
                    extra -= 15
                    if extra < 255:
                        out.append(extra)
                    else:
                        out.append(255)
                        extra += 15 + 7
                        out += struct.pack("<H", extra) if extra < 1 << 16 else struct.pack(
                            "<HI", 0, extra)
            step = best
        for k in range(i, min(i + step, len(data) - 2)):
            recent.setdefault(data[k : k + 3], []).append(k)
            del recent[data[k : k + 3]][:-candidates]
        i += step
    if nflags < 32:  # then a 1 (a match flag with no input left: the end) and 1s
        flags = ((flags << 1 | 1) << (31 - nflags)) | ((1 << (31 - nflags)) - 1)
    struct.pack_into("<I", out, flag_at, flags)
    return bytes(out)


def _key(name: str, parent: int, flags: int, payload: bytes) -> bytes:
    raw = name.encode() + b"\0"
    size = 0x15 + len(raw) + len(payload)
    prefix = struct.pack("<BBII6sIB", 1, flags, size, parent, b"", 0, len(raw))
    return prefix + raw + payload


def make_vmrs(path: str | os.PathLike[str], blocks: dict[int, tuple[bytes, bool]], *,
              header_at: int = 0, other_keys: tuple[str, ...] = (),
              outside: dict[int, bytes] | None = None) -> Path:
    """A saved state whose ``savedstate`` key holds ``RamBlock<N>`` for each ``N: (stored,
    external)`` (stored: 1 MiB raw or a token stream; external: in a data object, else
    inline). ``other_keys`` are extra children of savedstate; ``outside`` RamBlocks sit under
    another root (not memory of the saved state)."""
    objects_size = 8 + 18 * (1 + sum(1 for _, ext in blocks.values() if ext))
    key_at = 0x2000 + objects_size + (-objects_size % 0x1000)  # after the object table
    room = 0x1000 + sum(len(st) + 64 for st, ext in blocks.values() if not ext) + sum(
        len(st) + 64 for st in (outside or {}).values()) + 64 * (len(other_keys) + len(blocks))
    data_at = key_at + room + (-room % 0x1000)
    objects: list[tuple[int, int, int]] = []
    data = bytearray()
    table = bytearray(struct.pack("<HHHI", 2, 0, 0, 0))
    root_id = len(table) << 16
    table += _key("savedstate", 0, 0, b"")
    for name in other_keys:
        table += _key(name, root_id, 0, struct.pack("<I", 0))
    for n, (stored, external) in sorted(blocks.items()):
        if external:
            where = data_at + len(data)
            objects.append((3, where, len(stored)))
            data += stored + bytes(-len(stored) % 0x1000)
            table += _key(f"RamBlock{n}", root_id, 1, struct.pack("<IQ", len(stored), where))
        else:
            table += _key(f"RamBlock{n}", root_id, 0, struct.pack("<I", len(stored)) + stored)
    if outside:
        other_id = len(table) << 16
        table += _key("otherstate", 0, 0, b"")
        for n, stored in outside.items():
            table += _key(f"RamBlock{n}", other_id, 0, struct.pack("<I", len(stored)) + stored)
    assert key_at + len(table) <= data_at
    objects.insert(0, (2, key_at, len(table)))
    out = bytearray(max(data_at + len(data), 0x3000))
    header = HEADER.pack(SIGNATURE, 0, 5, 0x400, b"", 0x1000, b"", 0, 0)
    out[header_at : header_at + HEADER.size] = header
    if header_at == 0:  # an older copy at 0x1000 (lower sequence): the newer one wins
        out[0x1000 : 0x1000 + HEADER.size] = HEADER.pack(SIGNATURE, 0, 4, 0x400, b"", 0x1000,
                                                         b"", 0, 0)
    otab = struct.pack("<II", 0x01110001, len(objects)) + b"".join(
        OBJECT_ENTRY.pack(kind, 0, off, size, 0) for kind, off, size in objects)
    out[0x2000 : 0x2000 + len(otab)] = otab
    out[key_at : key_at + len(table)] = table
    out[data_at : data_at + len(data)] = data
    Path(path).write_bytes(out)
    return Path(path)
