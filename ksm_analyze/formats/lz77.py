"""Plain LZ77 decompression ("LZXPRESS", Windows compression format 3), [MS-XCA] section 2.4.

Hyper-V compresses the pages of a saved state (``.vmrs``) with it. Written here, not taken
from a package: the maintained Python implementation (``dissect.util.compression.lzxpress``)
takes no output length and lets a match claim 4 GiB (unbounded memory on hostile input), and
the other one on PyPI (``xpress-lz77``) is a single 2024 release whose wheel ships a GPL
licence under an Apache-2.0 tag. This one writes at most the length the container says and
raises ValueError on anything the format does not allow. Runs of literals are copied as
slices and matches as slice or pattern copies, so the loop is per token, not per byte.
"""

from __future__ import annotations

__all__ = ["decompress"]


def decompress(src: bytes | memoryview, out_len: int) -> bytearray:
    """Decode ``src`` to exactly ``out_len`` bytes (ValueError if it does not)."""
    out = bytearray()
    n = len(src)
    i = 0
    flags = nflags = 0
    half = -1  # where the unused high nibble of a shared length byte is
    while len(out) < out_len:
        if nflags == 0:
            if i + 4 > n:
                raise ValueError(f"the flag word at byte {i} runs past the end")
            flags = int.from_bytes(src[i : i + 4], "little")
            i += 4
            nflags = 32
        rest = flags & ((1 << nflags) - 1)
        literals = nflags - rest.bit_length()  # clear bits before the next match flag
        if literals:
            k = min(literals, n - i, out_len - len(out))
            if k == 0:
                raise ValueError(f"a literal at byte {i} runs past the end")
            out += src[i : i + k]
            i += k
            nflags -= k
            continue
        nflags -= 1
        if i == n:
            break  # a match flag with no input left: the end of the stream
        if i + 2 > n:
            raise ValueError(f"the match at byte {i} runs past the end")
        match = src[i] | src[i + 1] << 8
        i += 2
        length, offset = match & 7, (match >> 3) + 1
        if length == 7:
            if half < 0:
                if i >= n:
                    raise ValueError(f"the match length at byte {i} runs past the end")
                length = src[i] & 0x0F
                half = i
                i += 1
            else:
                length = src[half] >> 4
                half = -1
            if length == 15:
                if i >= n:
                    raise ValueError(f"the match length at byte {i} runs past the end")
                length = src[i]
                i += 1
                if length == 255:
                    if i + 2 > n:
                        raise ValueError(f"the match length at byte {i} runs past the end")
                    length = src[i] | src[i + 1] << 8
                    i += 2
                    if length == 0:
                        if i + 4 > n:
                            raise ValueError(f"the match length at byte {i} runs past the end")
                        length = int.from_bytes(src[i : i + 4], "little")
                        i += 4
                    if length < 15 + 7:
                        raise ValueError(f"match length {length} at byte {i} is too short")
                    length -= 15 + 7
                length += 15
            length += 7
        length += 3
        start = len(out) - offset
        if start < 0:
            raise ValueError(f"the match at byte {i} reaches {offset} bytes back, before the "
                             "start of the output")
        if len(out) + length > out_len:
            raise ValueError(f"the match at byte {i} writes past the {out_len} bytes expected")
        if offset >= length:
            out += out[start : start + length]
        else:
            pattern = out[start:]
            out += (pattern * (length // offset + 1))[:length]
    if len(out) != out_len:
        raise ValueError(f"decoded {len(out)} bytes, not {out_len}")
    return out
