"""On-disk cache of compiled TVM kernels, shared by processes.

An entry is ``<digest>.so`` plus ``<digest>.json`` naming what it holds. The digest covers the kernel key,
the target, the CPU's model and ISA extensions (`cpu.identity`), the TVM / tvm-ffi versions and the kernel
source, so any change compiles anew. Writes go to a
temporary file renamed into place (atomic on POSIX): readers see a whole entry or none, and two processes
compiling the same kernel both succeed (the last rename wins, both files are valid). The sidecar holds the
SHA-256 of the library, checked before it is loaded: a truncated or foreign file is rebuilt instead of being
handed to the dynamic loader (which can fault on a damaged ELF). So is an entry that lacks its function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from sparsecc.core.files import atomic_write, cache_root

log = logging.getLogger("sparsecc")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class KernelCache:
    """Compiled kernels by name: in memory for this process, on disk across processes."""

    def __init__(self, target: Any, source_files: tuple[Path, ...], directory: Optional[Path] = None,
                 cpu: Optional[dict] = None) -> None:
        self.target = target
        self.directory = (directory or cache_root()) / "kernels"
        digest = hashlib.sha256()
        for f in source_files:
            digest.update(f.read_bytes())
        self.fingerprint = {
            "target": str(target),
            "tvm": _version("apache-tvm"),
            "tvm_ffi": _version("apache-tvm-ffi"),
            "source": digest.hexdigest()[:16],
            **(cpu or {}),
        }
        self._loaded: dict[str, Callable] = {}
        self._modules: list[Any] = []      # loaded libraries stay alive as long as their functions
        self._lock = threading.Lock()
        self.stats = {"memory": 0, "disk": 0, "built": 0, "rebuilt": 0}

    def _paths(self, name: str) -> tuple[Path, Path, dict]:
        meta = {"function": name, **self.fingerprint}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"{digest}.so", self.directory / f"{digest}.json", meta

    def get(self, name: str, build: Callable[[], Any]) -> Callable:
        """The kernel called ``name``; ``build()`` returns its IRModule when it must be compiled."""
        fn = self._loaded.get(name)
        if fn is not None:
            self.stats["memory"] += 1
            return fn
        with self._lock:
            fn = self._loaded.get(name)
            if fn is None:
                fn = self._load_or_build(name, build)
                self._loaded[name] = fn
            return fn

    def _load_or_build(self, name: str, build: Callable[[], Any]) -> Callable:
        import tvm

        so, sidecar, meta = self._paths(name)
        if so.exists():
            try:
                if json.loads(sidecar.read_text()) != {**meta, "sha256": _sha256(so)}:
                    raise ValueError("sidecar does not describe this library")
                module = tvm.runtime.load_module(str(so))
                fn = module.get_function(name)
                if fn is None:
                    raise ValueError(f"module has no function {name}")
                self._modules.append(module)
                self.stats["disk"] += 1
                return fn
            except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt
                log.warning("sparsecc kernel cache: rebuilding %s (%s: %s)", so.name, type(exc).__name__, exc)
                self.stats["rebuilt"] += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        executable = tvm.compile(build(), target=self.target)
        atomic_write(so, executable.export_library)
        meta["sha256"] = _sha256(so)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, sort_keys=True)))
        self.stats["built"] += 1
        module = tvm.runtime.load_module(str(so))
        self._modules.append(module)
        return module.get_function(name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
