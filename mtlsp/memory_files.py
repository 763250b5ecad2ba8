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

Entries are stored as the model defines them (unit-norm keys, values) in a compact form: keys
in fp16 (what the model computes them in on an accelerator) and values in int8 with one scale
per entry, plus each token's byte offset in its chunk for provenance.  198 bytes per token at
the shipped 64-dimensional head, under the 256 that fp16 values would need before any
bookkeeping.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import msgpack
import numpy as np

FORMAT = 1
MANIFEST = "manifest.msgpack"
LOCK = "writer.lock"
_MANIFEST_MAGIC = b"MTLSPMF1"
_SEGMENT_MAGIC = b"MTLSPSG1"
_SEGMENT_HEADER = struct.Struct("<8sIIII")  # magic, format, rows, dim, crc32 of the payload


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


@dataclass(frozen=True)
class Entries:
    """Memory entries in storage form; row ``i`` is one token.

    ``keys`` (n, D) fp16 unit vectors; ``values`` (n, D) int8 and ``scales`` (n,) fp16 with
    value = values * scales / 127; ``offsets`` (n,) uint32: the token's first byte, relative to
    its chunk's start (relative, so a chunk that only moves keeps its entries).
    """

    keys: np.ndarray
    values: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_float(cls, keys: np.ndarray, values: np.ndarray, offsets: np.ndarray) -> Entries:
        """Quantise float keys/values as the model produced them; checks shapes and finiteness."""
        keys = np.asarray(keys, dtype=np.float32)
        values = np.asarray(values, dtype=np.float32)
        offsets = np.asarray(offsets)
        if keys.ndim != 2 or values.shape != keys.shape or offsets.shape != (keys.shape[0],):
            raise StoreError(
                f"entries must be keys (n, D), values (n, D) and offsets (n,); got "
                f"{keys.shape}, {values.shape}, {offsets.shape}"
            )
        if not (np.isfinite(keys).all() and np.isfinite(values).all()):
            raise StoreError("entries contain NaN or infinite numbers")
        if offsets.size and (offsets.min() < 0 or offsets.max() >= 2**32):
            raise StoreError("entry offsets must fit in 32 bits")
        peak = np.abs(values).max(axis=1)
        scales = np.where(peak > 0, peak, 1.0).astype(np.float16)
        # Quantise against the fp16-rounded scale so that dequantisation uses the same number.
        q = np.rint(values / scales.astype(np.float32)[:, None] * 127.0)
        return cls(
            keys.astype(np.float16),
            np.clip(q, -127, 127).astype(np.int8),
            scales,
            offsets.astype(np.uint32),
        )

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def float_values(self) -> np.ndarray:
        return dequantize(self.values, self.scales)

    def take(self, start: int, stop: int) -> Entries:
        return Entries(*(a[start:stop] for a in (self.keys, self.values, self.scales, self.offsets)))

    @staticmethod
    def concat(parts: list[Entries], dim: int) -> Entries:
        if not parts:
            return Entries(
                np.zeros((0, dim), np.float16), np.zeros((0, dim), np.int8),
                np.zeros(0, np.float16), np.zeros(0, np.uint32),
            )
        return Entries(*(np.concatenate(a) for a in zip(*((p.keys, p.values, p.scales, p.offsets) for p in parts))))


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) * (scales.astype(np.float32) / 127.0)[..., None]


def segment_name(seg: int) -> str:
    return f"seg-{seg:08d}.bin"


def segment_id(name: str) -> int | None:
    """The id in a segment file name, or None for any other name."""
    if name.startswith("seg-") and name.endswith(".bin") and name[4:-4].isdigit():
        return int(name[4:-4])
    return None


def write_segment(directory: Path, seg: int, entries: Entries) -> None:
    payload = [np.ascontiguousarray(a).data for a in (entries.keys, entries.values, entries.scales, entries.offsets)]
    crc = 0
    for part in payload:
        crc = zlib.crc32(part, crc)
    header = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, FORMAT, len(entries), entries.dim, crc)
    atomic_write(directory / segment_name(seg), [header, *payload])


def read_segment(directory: Path, seg: int, dim: int) -> Entries:
    """Load and verify one segment; ``FileNotFoundError`` if absent, ``CorruptStore`` if bad."""
    path = directory / segment_name(seg)
    data = path.read_bytes()
    if len(data) < _SEGMENT_HEADER.size:
        raise CorruptStore(f"{path}: truncated ({len(data)} bytes)")
    magic, fmt, rows, seg_dim, crc = _SEGMENT_HEADER.unpack_from(data)
    if magic != _SEGMENT_MAGIC or fmt != FORMAT:
        raise CorruptStore(f"{path}: not an mtlsp segment (format {fmt})")
    if seg_dim != dim:
        raise CorruptStore(f"{path}: entries of dimension {seg_dim}, the store holds {dim}")
    sizes = [rows * dim * 2, rows * dim, rows * 2, rows * 4]
    if len(data) != _SEGMENT_HEADER.size + sum(sizes):
        raise CorruptStore(f"{path}: {len(data)} bytes, expected {_SEGMENT_HEADER.size + sum(sizes)}")
    body = memoryview(data)[_SEGMENT_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise CorruptStore(f"{path}: checksum mismatch")
    arrays = []
    pos = 0
    for size, dtype, shape in zip(
        sizes, (np.float16, np.int8, np.float16, np.uint32), ((rows, dim), (rows, dim), (rows,), (rows,))
    ):
        arrays.append(np.frombuffer(body[pos : pos + size], dtype=dtype).reshape(shape))
        pos += size
    return Entries(*arrays)


def write_manifest(directory: Path, manifest: dict) -> None:
    body = msgpack.packb(manifest, use_bin_type=True)
    atomic_write(directory / MANIFEST, _MANIFEST_MAGIC + struct.pack("<I", zlib.crc32(body)) + body)


def read_manifest(directory: Path) -> dict | None:
    """The current manifest, None if the store has none yet, ``CorruptStore`` if unreadable."""
    path = directory / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < 12 or data[:8] != _MANIFEST_MAGIC:
        raise CorruptStore(f"{path}: not an mtlsp manifest")
    (crc,) = struct.unpack_from("<I", data, 8)
    if zlib.crc32(data[12:]) != crc:
        raise CorruptStore(f"{path}: checksum mismatch")
    try:
        manifest = msgpack.unpackb(data[12:], raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptStore(f"{path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptStore(f"{path}: unknown manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'}")
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
