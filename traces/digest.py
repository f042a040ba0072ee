"""Content digests that results are keyed by: a file's bytes, and the source of the packages that compute
them. A result stored under a digest is reused only while what it was computed from is unchanged."""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_files: dict[tuple[str, int, int], str] = {}


def bytes_sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's sha256, cached per process by (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _files[key] = h.hexdigest()
    return _files[key]


def digest_files(paths) -> str:
    """One digest of several files' contents, in the order given."""
    return bytes_sha256("".join(file_sha256(p) for p in paths))


@functools.lru_cache(maxsize=None)
def source_sha256(packages: tuple[str, ...]) -> str:
    """Digest of every ``.py`` file of the project's ``packages`` (paths and contents, in a fixed order)."""
    h = hashlib.sha256()
    for package in packages:
        for source in sorted((ROOT / package).rglob("*.py")):
            h.update(source.relative_to(ROOT).as_posix().encode())
            h.update(source.read_bytes())
    return h.hexdigest()
