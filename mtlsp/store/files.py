"""The memory store on disk: immutable segment files, one manifest per generation, one lock.

A store directory holds::

    manifest.msgpack    the current generation: every file's chunks and where their entries are
    seg-00000042.bin    the entries one update wrote; never modified once it has its name
    writer.lock         flock()ed by the single process that is writing

Why this shape: an update costs what the changed file costs (one new segment, one small
manifest), not what the store costs, and the manifest's rename is the only commit point, so a
process killed at any instant leaves the previous generation or the next one, never a mix.
Segments are written and fsynced before the manifest that names them; segments that no manifest
names any more are deleted only after the new manifest is durable.

An entry is one token: for each of the model's H memory key/value heads a key and a value
(raw attention keys, not unit-norm, their magnitudes varying by head), plus the token's id and
its byte offset in its chunk.  Keys and values are stored as int8 with one fp16 scale per
(token, head): 536 bytes per token at H=4, D=64, where fp16 would take 1,032 before any
bookkeeping.  The store searches and returns exactly these dequantised numbers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Self

import msgpack
import numpy as np

FORMAT = 2
MANIFEST = "manifest.msgpack"
LOCK = "writer.lock"
_MANIFEST_MAGIC = b"MTLSPMF1"
_SEGMENT_MAGIC = b"MTLSPSG1"
_SEGMENT_HEADER = struct.Struct("<8sIIIII")  # magic, format, rows, heads, dim, crc32 of the payload
_FP16_MAX = float(np.finfo(np.float16).max)


class StoreError(Exception):
    """A store cannot be used as asked (busy, wrong model, bad input); the message says why."""


class CorruptStore(StoreError):
    """A store file fails its checks: truncated, wrong magic, bad checksum, unparsable."""


def default_cache_root() -> Path:
    """``$MTLSP_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtlsp``, else ``~/.cache/mtlsp``."""
    if os.environ.get("MTLSP_CACHE_DIR"):
        return Path(os.environ["MTLSP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mtlsp"


def store_dir_for(workspace: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """The store directory of a workspace folder, keyed by its resolved path.

    The readable folder name helps a person find their store; the hash keeps two folders with
    the same name apart and keeps the name short whatever the path.
    """
    resolved = Path(workspace).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in resolved.name)[:40] or "root"
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "stores" / f"{name}-{digest}"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) readable by the owner only: memory entries encode code."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | list[bytes | memoryview]) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new.

    Temp file in the same directory, fsync, rename over ``path``, fsync the directory.  The temp
    name carries the pid so that a concurrent writer's leftovers are never mistaken for ours.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in [data] if isinstance(data, bytes) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``x`` (..., D) with one fp16 scale per vector: x ~ codes * scale / 127.

    The scale is the vector's largest magnitude, rounded to fp16 *before* quantising, so that
    dequantisation multiplies by the very number the codes were computed against: each
    component is then within half a step (scale / 254) of the original.
    """
    peak = np.abs(x).max(axis=-1)
    if peak.size and peak.max() > _FP16_MAX:
        raise StoreError(f"entries hold magnitudes up to {peak.max():.3g}, beyond fp16's {_FP16_MAX:.0f}")
    scales = np.where(peak > 0, peak, 1.0).astype(np.float16)
    q = np.rint(x / scales.astype(np.float32)[..., None] * 127.0)
    return np.clip(q, -127, 127).astype(np.int8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 vectors from int8 ``codes`` (..., D) and their fp16 ``scales`` (...)."""
    return codes.astype(np.float32) * (scales.astype(np.float32) / 127.0)[..., None]


@dataclass(frozen=True)
class Entries:
    """Memory entries in storage form; row ``i`` is one token, with one key and value per head.

    ``keys`` (n, H, D) int8 with ``key_scales`` (n, H) fp16, and ``values``/``value_scales``
    likewise (see ``quantize``); ``tokens`` (n,) uint32: the token ids, which the model mixes
    into its next-token distribution; ``offsets`` (n,) uint32: the token's first byte, relative
    to its chunk's start (relative, so a chunk that only moves keeps its entries).
    """

    keys: np.ndarray
    key_scales: np.ndarray
    values: np.ndarray
    value_scales: np.ndarray
    tokens: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_float(cls, keys: np.ndarray, values: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> Entries:
        """Quantise float keys/values (n, H, D) as the model produced them; checks shapes and ranges."""
        keys = np.asarray(keys, dtype=np.float32)
        values = np.asarray(values, dtype=np.float32)
        tokens, offsets = np.asarray(tokens), np.asarray(offsets)
        n = keys.shape[0] if keys.ndim else 0
        if keys.ndim != 3 or values.shape != keys.shape or tokens.shape != (n,) or offsets.shape != (n,):
            raise StoreError(
                f"entries must be keys (n, H, D), values (n, H, D), tokens (n,) and offsets (n,); got "
                f"{keys.shape}, {values.shape}, {tokens.shape}, {offsets.shape}"
            )
        if not (np.isfinite(keys).all() and np.isfinite(values).all()):
            raise StoreError("entries contain NaN or infinite numbers")
        for name, a in (("token ids", tokens), ("offsets", offsets)):
            if a.size and (a.min() < 0 or a.max() >= 2**32):
                raise StoreError(f"entry {name} must fit in 32 bits")
        return cls(*quantize(keys), *quantize(values), tokens.astype(np.uint32), offsets.astype(np.uint32))

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def heads(self) -> int:
        return self.keys.shape[1]

    @property
    def dim(self) -> int:
        return self.keys.shape[2]

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The six arrays, in field (and on-disk) order."""
        return (self.keys, self.key_scales, self.values, self.value_scales, self.tokens, self.offsets)

    def float_keys(self) -> np.ndarray:
        return dequantize(self.keys, self.key_scales)

    def float_values(self) -> np.ndarray:
        return dequantize(self.values, self.value_scales)

    def take(self, start: int, stop: int) -> Entries:
        return Entries(*(a[start:stop] for a in self.arrays()))

    @staticmethod
    def empty(heads: int, dim: int) -> Entries:
        return Entries(*(np.zeros(shape, dtype) for dtype, shape in _layout(0, heads, dim)))

    @staticmethod
    def concat(parts: Sequence[Entries], heads: int, dim: int) -> Entries:
        if not parts:
            return Entries.empty(heads, dim)
        return Entries(*(np.concatenate(a) for a in zip(*(p.arrays() for p in parts))))


def _layout(rows: int, heads: int, dim: int) -> list[tuple[type, tuple[int, ...]]]:
    """(dtype, shape) of each ``Entries`` array: the segment payload, in order."""
    return [
        (np.int8, (rows, heads, dim)), (np.float16, (rows, heads)),
        (np.int8, (rows, heads, dim)), (np.float16, (rows, heads)),
        (np.uint32, (rows,)), (np.uint32, (rows,)),
    ]


def bytes_per_token(heads: int, dim: int) -> int:
    """Payload bytes of one entry in a segment: 536 at H=4, D=64."""
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in _layout(1, heads, dim))


class ChunkRecord(NamedTuple):
    """One chunk of a file in the manifest: its bytes, its content hash, where its entries live,
    and the identifiers it defines (completion candidates, found by the indexer).

    ``(segment, row)`` is the chunk's id: the segment holding its ``tokens`` entries from row
    ``row``; stable until compaction moves them.  msgpack stores it as an array in field order
    (a NamedTuple packs as one).
    """

    start: int
    end: int
    hash: str
    segment: int
    row: int
    tokens: int
    names: tuple[str, ...] = ()

    @property
    def id(self) -> tuple[int, int]:
        return (self.segment, self.row)

    @classmethod
    def from_msgpack(cls, rec: object) -> ChunkRecord:
        if not isinstance(rec, list) or len(rec) != len(cls._fields) or not isinstance(rec[6], list):
            raise ValueError(f"bad chunk record {rec!r:.80}")
        return cls(*rec[:6], tuple(rec[6]))


def segment_name(seg: int) -> str:
    return f"seg-{seg:08d}.bin"


def segment_id(name: str) -> int | None:
    """The id in a segment file name, or None for any other name."""
    if name.startswith("seg-") and name.endswith(".bin") and name[4:-4].isdigit():
        return int(name[4:-4])
    return None


def write_segment(directory: Path, seg: int, parts: Sequence[Entries], heads: int, dim: int) -> None:
    """One segment holding ``parts`` one after the other; written without concatenating them."""
    payload = [np.ascontiguousarray(a).data for arrays in zip(*(p.arrays() for p in parts)) for a in arrays]
    crc = 0
    for part in payload:
        crc = zlib.crc32(part, crc)
    header = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, FORMAT, sum(len(p) for p in parts), heads, dim, crc)
    atomic_write(directory / segment_name(seg), [header, *payload])


def read_segment(directory: Path, seg: int, heads: int, dim: int) -> Entries:
    """Load and verify one segment; ``FileNotFoundError`` if absent, ``CorruptStore`` if bad."""
    path = directory / segment_name(seg)
    data = path.read_bytes()
    if len(data) < _SEGMENT_HEADER.size:
        raise CorruptStore(f"{path}: truncated ({len(data)} bytes)")
    magic, fmt, rows, seg_heads, seg_dim, crc = _SEGMENT_HEADER.unpack_from(data)
    if magic != _SEGMENT_MAGIC or fmt != FORMAT:
        raise CorruptStore(f"{path}: not an mtlsp segment of format {FORMAT}")
    if (seg_heads, seg_dim) != (heads, dim):
        raise CorruptStore(f"{path}: entries of {seg_heads} heads x {seg_dim} dims, the store holds {heads} x {dim}")
    expected = _SEGMENT_HEADER.size + rows * bytes_per_token(heads, dim)
    if len(data) != expected:
        raise CorruptStore(f"{path}: {len(data)} bytes, expected {expected}")
    body = memoryview(data)[_SEGMENT_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise CorruptStore(f"{path}: checksum mismatch")
    arrays = []
    pos = 0
    for dtype, shape in _layout(rows, heads, dim):
        size = np.dtype(dtype).itemsize * int(np.prod(shape))
        arrays.append(np.frombuffer(body[pos : pos + size], dtype=dtype).reshape(shape))
        pos += size
    return Entries(*arrays)


def write_checked(path: Path, magic: bytes, body: bytes) -> None:
    """Write ``body`` atomically behind an 8-byte ``magic`` and its crc32 (``read_checked``)."""
    atomic_write(path, [magic, struct.pack("<I", zlib.crc32(body)), body])


def read_checked(path: Path, magic: bytes, what: str) -> bytes | None:
    """The body ``write_checked`` wrote; None if there is no file; ``CorruptStore`` if its magic
    or checksum is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < 12 or data[:8] != magic:
        raise CorruptStore(f"{path}: not an mtlsp {what}")
    (crc,) = struct.unpack_from("<I", data, 8)
    if zlib.crc32(data[12:]) != crc:
        raise CorruptStore(f"{path}: checksum mismatch")
    return data[12:]


def write_manifest(directory: Path, manifest: dict) -> None:
    write_checked(directory / MANIFEST, _MANIFEST_MAGIC, msgpack.packb(manifest, use_bin_type=True))


def read_manifest(directory: Path) -> dict | None:
    """The current manifest, None if the store has none yet, ``CorruptStore`` if unreadable."""
    path = directory / MANIFEST
    body = read_checked(path, _MANIFEST_MAGIC, "manifest")
    if body is None:
        return None
    try:
        manifest = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptStore(f"{path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else "?"
        raise CorruptStore(f"{path}: manifest format {found}, this mtlsp reads format {FORMAT}")
    try:
        for f in manifest["files"].values():
            f["chunks"] = [ChunkRecord.from_msgpack(rec) for rec in f["chunks"]]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CorruptStore(f"{path}: {e}") from e
    return manifest


class WriterLock:
    """Exclusive ``flock`` on the store's lock file: one writing process at a time.

    flock is released by the kernel when its holder dies, so a killed writer never leaves the
    store locked.  Waits up to ``timeout`` seconds, then says who is likely holding it.
    """

    def __init__(self, directory: Path, timeout: float) -> None:
        self.path = directory / LOCK
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> Self:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreError(
                        f"{self.path.parent}: another process (an indexer or language server) "
                        f"has been writing for over {self.timeout:.0f} s"
                    ) from None
                time.sleep(0.005)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
