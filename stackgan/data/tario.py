"""The one shard reader: a tar index of member offsets, field reads by offset, image and .npy decoding.

The training stream (random access, many times per sample) and the evaluation set (each
sample once, in order) read shards through these functions, so both see the same samples,
the same field names and the same pixels.

A sample's image is found by its stored size whatever its extension: asking for ``76.jpg``
gets the member ``<key>.76.jpg``, or ``<key>.76.png`` (or ``.jpeg``/``.webp``) in a set
written with lossless images; :func:`decode_image` reads any of them (by content, not name).
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .storage import ShardError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------------------
# The index: member offsets grouped by sample
# --------------------------------------------------------------------------------------
@dataclass
class TarIndex:
    where: str  # the shard as the user knows it (messages)
    # (key, {ext: (data offset, size)}) per sample, in file order
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = field(default_factory=list)
    problem: str = ""  # why samples are missing ("" when the shard is whole)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: key = path up to the first dot of the last component."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


class _Exotic(Exception):
    """A header the fast scanner leaves to the tarfile module (long names, pax, huge files)."""


_ZERO_BLOCK = bytes(512)
_Members = list[tuple[str, int, int]]  # (name, data offset, size) of each regular member


def _octal(raw: bytes) -> int:
    try:
        return int(raw.split(b"\0", 1)[0].strip(), 8)
    except ValueError:
        return -1


def _scan_fast(fd: int, size: int) -> tuple[_Members, str]:
    """Members from the ustar headers alone, and what is wrong with the file ("" if nothing).

    About 5x faster than ``tarfile`` (a TarInfo per member, a checksum per header in Python):
    indexing the shards is a start-up cost of every loader worker. Checksums are verified
    for all headers at once; the members before the first bad header are kept."""
    members, headers, problem = [], [], ""
    off = 0
    while off < size:
        hdr = os.pread(fd, 512, off)
        if len(hdr) < 512:
            problem = f"truncated tar: partial header at byte {off}"
            break
        if hdr == _ZERO_BLOCK:
            break  # end-of-archive marker
        flag = hdr[156:157]
        if flag not in b"0\x0075" or hdr[124] & 0x80:
            raise _Exotic
        headers.append(hdr)
        try:
            msize = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        except (ValueError, UnicodeDecodeError) as e:
            problem = f"corrupt tar: unreadable header at byte {off} ({e})"
            break
        data = off + 512
        if data + msize > size:
            problem = f"truncated tar: member {name!r} runs past the end of the file"
            break
        if flag != b"5":  # not a directory
            members.append((name, data, msize))
        off = data + (msize + 511) // 512 * 512
    if headers:  # checksum: byte sum of the header with its 8 checksum bytes read as spaces
        blocks = np.frombuffer(b"".join(headers), np.uint8).reshape(-1, 512).astype(np.int64)
        sums = blocks.sum(1) - blocks[:, 148:156].sum(1) + 8 * 32
        bad = np.flatnonzero(sums != np.asarray([_octal(h[148:156]) for h in headers]))
        if len(bad):
            first = int(bad[0])  # members are listed in header order, directories excepted
            kept = sum(1 for h in headers[:first] if h[156:157] != b"5")
            return members[:kept], f"corrupt tar: bad checksum in header #{first}"
    return members, problem


def _scan_tarfile(fd: int, size: int) -> tuple[_Members, str]:
    """The same through the tarfile module (any tar dialect)."""
    members: _Members = []
    with os.fdopen(fd, "rb", closefd=False) as f:
        f.seek(0)
        tf = tarfile.open(fileobj=f, mode="r:")
        while True:
            try:
                ti = tf.next()
            except (tarfile.TarError, OSError) as e:
                return members, f"truncated or corrupt tar ({e})"
            if ti is None:
                return members, ""
            tf.members = []  # do not keep every TarInfo
            if ti.offset_data + ti.size > size:
                return members, f"truncated tar: member {ti.name!r} runs past the end of the file"
            if ti.isreg():
                members.append((ti.name, ti.offset_data, ti.size))


def index_tar(fd: int, where: str, expected: int | None = None) -> TarIndex:
    """Offsets of every member of the open shard ``fd``, grouped by sample; notes truncation and,
    when ``expected`` is given, a sample count that differs from metadata.json's."""
    idx = TarIndex(where)
    try:
        size = os.fstat(fd).st_size
        try:
            members, problem = _scan_fast(fd, size)
        except _Exotic:
            members, problem = _scan_tarfile(fd, size)
    except (tarfile.TarError, OSError) as e:
        members, problem = [], f"cannot read as a tar file ({e})"
    for name, off, n in members:
        key, ext = split_name(name)
        if not idx.samples or idx.samples[-1][0] != key:
            idx.samples.append((key, {}))
        idx.samples[-1][1][ext] = (off, n)
    if problem:
        idx.problem = f"{problem}; {len(idx.samples)} samples before it"
    elif expected is not None and len(idx.samples) != expected:
        idx.problem = (f"holds {len(idx.samples)} samples, metadata.json says {expected} "
                       "(truncated or replaced?)")
    return idx


# --------------------------------------------------------------------------------------
# Reading fields
# --------------------------------------------------------------------------------------
def member_of(members: dict[str, tuple[int, int]], wanted: str) -> str | None:
    """The member holding field ``wanted``: itself, or for an image ``<size>.<ext>`` the one
    image of that size whatever its extension (``76.jpg`` finds ``76.png``)."""
    size, _, ext = wanted.partition(".")
    if not (size.isdigit() and ext in IMAGE_EXTS):
        return wanted if wanted in members else None
    found = [m for m in members if m.partition(".")[0] == size and m.partition(".")[2] in IMAGE_EXTS]
    if len(found) > 1:
        raise ValueError(f"several {size}px images ({', '.join(sorted(found))})")
    return found[0] if found else None


def read_fields(fd: int, idx: TarIndex, i: int, fields: tuple[str, ...]) -> dict[str, bytes]:
    """Raw bytes of ``fields`` of sample ``i`` (keyed by the names asked for) and ``__key__``."""
    key, members = idx.samples[i]
    out = {"__key__": key.encode()}
    try:
        names = [member_of(members, f) for f in fields]
    except ValueError as e:
        raise ShardError(f"{idx.where}: sample {key!r}: {e}") from None
    missing = [f for f, m in zip(fields, names) if m is None]
    if missing:
        raise ShardError(f"{idx.where}: sample {key!r} lacks {', '.join(missing)}")
    try:
        for f, m in zip(fields, names):
            off, size = members[m]
            out[f] = os.pread(fd, size, off)
            if len(out[f]) != size:
                raise ShardError(f"{idx.where}: sample {key!r}: {f} truncated")
    except OSError as e:
        raise ShardError(f"{idx.where}: sample {key!r}: {e}") from e
    return out


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------
try:  # libjpeg-turbo / libpng without PIL's per-image Python parsing: 2-3x faster on 76x76 crops
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _tv_decode

    def _decode(data: bytes) -> np.ndarray:
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return _tv_decode(buf, mode=ImageReadMode.RGB).numpy()
        except RuntimeError as e:
            raise ValueError(f"image decode failed ({str(e).splitlines()[0]})") from None
except ImportError:  # pragma: no cover -- torchvision missing or broken
    def _decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 (3, H, W) RGB; ``size``: the side it must have (else ValueError)."""
    img = _decode(data)
    if size is not None and img.shape != (3, size, size):
        raise ValueError(f"{size}px image is {img.shape[2]}x{img.shape[1]}")
    return img


@contextlib.contextmanager
def quiet_decoder():
    """torchvision 0.29 warns on every decode that its decoders move to torchcodec (the PIL
    fallback takes over once they are gone): silence that one warning around a batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                category=DeprecationWarning)
        yield


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def load_npy(buf: bytes) -> np.ndarray:
    """np.load for in-memory .npy, parsing each distinct header once (np.load compiles it)."""
    if buf[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    width = 2 if buf[6] == 1 else 4  # header-length field: 2 bytes in format 1.0, 4 after
    hlen, start = int.from_bytes(buf[8:8 + width], "little"), 8 + width
    header = buf[:start + hlen]
    if header not in _NPY_HEADERS:
        f = io.BytesIO(header)
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        _NPY_HEADERS[header] = (dtype, shape, fortran, start + hlen)
    dtype, shape, fortran, offset = _NPY_HEADERS[header]
    count = int(np.prod(shape))
    if len(buf) - offset != count * dtype.itemsize:
        raise ValueError(f"truncated: {len(buf) - offset} data bytes for {dtype} {shape}")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
