"""A strict, fast reader of the tar members of one shard, and a fast ``.npy`` decoder.

Why not :mod:`tarfile`: parsing its headers in Python took as long as decoding the JPEG images
themselves (``aol bench loader``, docs/data.md). A shard is a plain ustar archive written by
:func:`aol_dist.data.shards.write_shard`, so reading it needs only the name, size and type of each
512-byte header, checked against the header checksum. PAX (``x``) and GNU long-name (``L``) headers
from other writers are understood, so shards made by other WebDataset tools read too.

Stricter than :mod:`tarfile` on purpose: an archive that ends without its end-of-archive block, even
exactly between two members, is reported as truncated instead of read as a shorter shard.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Iterator

import numpy as np

BLOCK = 512
_ZERO = bytes(BLOCK)


class TarFormatError(ValueError):
    """The bytes are not a whole tar archive; the message says where it broke."""


def _octal(field: bytes, what: str, offset: int) -> int:
    text = field.split(b"\0", 1)[0].strip()
    if field[:1] and field[0] & 0x80:  # GNU base-256: only for members of 8 GiB and more, never in a shard
        raise TarFormatError(f"member header at byte {offset}: base-256 {what} not supported")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"member header at byte {offset}: {what} {text[:12]!r} is not octal") from None


def _pax_path(payload: bytes) -> str | None:
    """The ``path`` record of a PAX extended header, if any (records are ``"<len> key=value\\n"``)."""
    i = 0
    while i < len(payload):
        space = payload.find(b" ", i)
        if space < 0:
            break
        length = int(payload[i:space])
        key, _, value = payload[space + 1:i + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        i += length
    return None


def iter_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in the archive at ``path``, in order.

    Raises :class:`TarFormatError` for a bad checksum, a member running past the end of the file, or a
    missing end-of-archive block; ``OSError`` if the file cannot be read.
    """
    data = Path(path).read_bytes()
    n, off = len(data), 0
    long_name: str | None = None
    while True:
        if off + BLOCK > n:
            raise TarFormatError(f"ends at byte {n} without the end-of-archive block")
        header = data[off:off + BLOCK]
        if header == _ZERO:
            return
        stored = _octal(header[148:156], "checksum", off)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:  # the checksum field counts as spaces
            raise TarFormatError(f"member header at byte {off}: checksum mismatch (not a tar, or damaged)")
        size = _octal(header[124:136], "size", off)
        kind = header[156:157]
        start = off + BLOCK
        if start + size > n:
            raise TarFormatError(f"member at byte {off} needs {size} bytes, the file ends after {n - start}")
        off = start + (size + BLOCK - 1) // BLOCK * BLOCK
        payload = data[start:start + size]
        if kind == b"x":
            long_name = _pax_path(payload) or long_name
            continue
        if kind == b"L":
            long_name = payload.split(b"\0", 1)[0].decode("utf-8")
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: no sample data
            long_name = None
            continue
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
            name = f"{prefix}/{name}" if prefix else name
        yield (long_name or name), payload
        long_name = None


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    d = ast.literal_eval(header.decode("latin1"))
    return np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"])


def decode_npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> array; headers repeat across samples, so each distinct one is parsed once.

    Falls back to :func:`numpy.load` for anything but a version 1/2 header of a plain dtype.
    """
    if data[:6] == b"\x93NUMPY" and data[6] in (1, 2):
        size_bytes = 2 if data[6] == 1 else 4
        start = 8 + size_bytes
        hlen = int.from_bytes(data[8:start], "little")
        dtype, shape, fortran = _npy_header(bytes(data[start:start + hlen]))
        if not dtype.hasobject:
            count = int(np.prod(shape)) if shape else 1
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=start + hlen)
            return flat.reshape(shape, order="F" if fortran else "C").copy()
    import io

    return np.load(io.BytesIO(data), allow_pickle=False)
