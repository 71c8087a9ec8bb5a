"""Atomic file writes: every file sparsecc produces (exports, saved programs, engines, cached kernels and tuning
entries) is written to a temporary file beside its destination and renamed over it, so a reader never sees a
partial file and a failed write leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[str], Any]) -> Any:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``; on any failure the temporary
    file is removed and the error raised. Returns what ``write`` returned. The temporary name keeps the
    destination's suffix (TVM's ``export_library`` picks the format by it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def cache_root() -> Path:
    """Where sparsecc keeps what it measures and compiles per machine (kernels, tuning): ``$SPARSECC_CACHE_DIR``
    or ``~/.cache/sparsecc``."""
    root = os.environ.get("SPARSECC_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sparsecc"
