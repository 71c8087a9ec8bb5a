"""What every file writer shares (ONNX, TensorRT, TVM library, Triton repository, `.pt2`): a target path that is
refused before any work if it cannot be written, and one error listing every op the file's format cannot
express."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparsecc.core.errors import ExportError


def writable_target(path: Path) -> None:
    """Refuse a path that cannot be written (missing directory, a directory, no permission) with `ExportError`."""
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist (create it first)")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; give a file name such as {path / 'model.onnx'}")
    try:    # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: directory {parent} is not writable ({exc.strerror})") from exc
    os.close(fd)
    os.unlink(probe)


def refuse_missing(missing: dict[str, list[str]], into: str, fix: str) -> None:
    """One `ExportError` listing every op without a translation (and where it is called), or nothing."""
    if missing:
        listed = "; ".join(f"{op} (in {', '.join(sorted(set(where))[:3])})" for op, where in sorted(missing.items()))
        raise ExportError(f"{len(missing)} op(s) have no {into} translation: {listed}. {fix}")
