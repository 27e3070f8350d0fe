"""The cache directory and a check that a directory is writable.

The cache holds what lit-distill trains once and reuses: the BPE tokenizers and the demo's teacher.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LIT_DISTILL_CACHE``, else ``$XDG_CACHE_HOME/lit-distill``, else ``~/.cache/lit-distill``."""
    if os.environ.get("LIT_DISTILL_CACHE"):
        return Path(os.environ["LIT_DISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit-distill"


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that it is writable (a clear error instead of a late one)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"cache directory {path} is not writable ({err.strerror}); pass another one (cache_dir=... or"
            " --cache-dir) or set LIT_DISTILL_CACHE"
        ) from err
    return path


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
