"""The on-disk cache of compiled kernels (host libraries and cubins): where it lives, and files
written with a digest beside them, so a damaged or truncated one is noticed and rebuilt, never
loaded."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional


def root() -> Path:
    return Path(os.environ.get("SJ_TF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sj_temporal_fusion"))


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_verified(path: Path) -> bool:
    """True if ``path`` exists and matches the digest written beside it; says so when it does not."""
    digest = _digest_path(path)
    if not (path.exists() and digest.exists()):
        return False
    if hashlib.sha256(path.read_bytes()).hexdigest() == digest.read_text().strip():
        return True
    print(f"sj_temporal_fusion: the cached kernel {path} does not match its digest (damaged or truncated); "
          f"rebuilding it", file=sys.stderr, flush=True)
    return False


def read_verified(path: Path) -> Optional[bytes]:
    return path.read_bytes() if is_verified(path) else None


def commit(tmp: Path, path: Path) -> None:
    """Move a finished build ``tmp`` into place, then write its digest (a crash between the two
    leaves a file without a digest: rebuilt)."""
    data = tmp.read_bytes()
    os.replace(tmp, path)
    _digest_path(path).write_text(hashlib.sha256(data).hexdigest() + "\n")


def write_verified(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    commit(tmp, path)
