"""The on-disk cache of compiled kernels (host libraries and cubins): where it lives, and files
written with a digest beside them, so a damaged or truncated one is noticed and rebuilt, never
loaded. Every file is written under a temporary name unique to its process and thread, then
renamed into place, so concurrent writers of one entry never mix their bytes."""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional


def root() -> Path:
    return Path(os.environ.get("SJ_TF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sj_temporal_fusion"))


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_verified(path: Path) -> Optional[bytes]:
    """The bytes of ``path`` if they match the digest written beside it (read once, so what is
    checked is what is returned), else None; says so when a file is there but does not match."""
    digest = _digest_path(path)
    try:
        data, expected = path.read_bytes(), digest.read_text().strip()
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() == expected:
        return data
    print(f"sj_temporal_fusion: the cached kernel {path} does not match its digest (damaged or truncated); "
          f"rebuilding it", file=sys.stderr, flush=True)
    return None


def is_verified(path: Path) -> bool:
    """True if ``path`` exists and matches the digest written beside it; says so when it does not."""
    return read_verified(path) is not None


def _replace_with(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file unique to this process and thread beside ``path``, then
    rename it over ``path`` (atomic on one file system)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def commit(tmp: Path, path: Path) -> None:
    """Move a finished build ``tmp`` into place, then write its digest (a crash between the two
    leaves a file without a matching digest: rebuilt)."""
    data = tmp.read_bytes()
    os.replace(tmp, path)
    _replace_with(_digest_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())


def write_verified(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_with(path, data)
    _replace_with(_digest_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())
