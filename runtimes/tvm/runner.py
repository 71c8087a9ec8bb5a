"""Load and run a library written by `sparsecc.export_tvm` with TVM and numpy only.

This file imports nothing from torch or sparsecc, so a deployment can copy it next to the library:
``python runner.py model.so`` prints the library's metadata and runs it once on random inputs, and
``load(path)`` returns a callable taking numpy arrays (or anything ``numpy.asarray`` accepts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when what a library expects (inputs, metadata) changes.
FORMAT = 1
META_FUNCTION = "sparsecc_meta"


class LoadError(Exception):
    """The file is not a library this version can run; `sparsecc.load_tvm` re-raises it as `VersionError`."""


class InputMismatch(ValueError):
    """Inputs that differ in number or shape from those the library was exported for."""


class TvmModel:
    """A loaded library: call it with the inputs it was exported for, get numpy arrays back (one array for
    a single output). ``meta`` holds the versions that wrote it and the input / output shapes."""

    def __init__(self, path: "str | Path") -> None:
        import tvm
        from tvm import relax

        path = Path(path)
        if not path.is_file():
            raise LoadError(f"{path} is not a file")
        try:
            library = tvm.runtime.load_module(str(path))
            self._vm = relax.VirtualMachine(library, tvm.cpu())
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error types for foreign files
            raise LoadError(f"{path} is not a TVM library this TVM ({tvm.__version__}) can load: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        try:
            meta_fn = self._vm[META_FUNCTION]
        except Exception as exc:  # noqa: BLE001 - a missing function is an AttributeError or a TVMError
            raise LoadError(f"{path} was not written by sparsecc.export_tvm (no {META_FUNCTION} inside)") from exc
        self.meta: dict = json.loads(meta_fn().numpy().tobytes().decode())
        if self.meta.get("format") != FORMAT:
            raise LoadError(f"{path} was written by sparsecc {self.meta.get('sparsecc')} in library format "
                            f"{self.meta.get('format')}; this loader reads format {FORMAT}. Export the model "
                            f"again with this version")
        self._main = self._vm["main"]
        self._tensor = tvm.runtime.tensor
        self.path = path

    @property
    def input_names(self) -> list[str]:
        """The inputs' names (the model's ``forward`` parameters or keyword keys; ``input{i}`` in libraries
        written before names were recorded)."""
        return self.meta.get("names") or [f"input{i}" for i in range(len(self.meta["inputs"]))]

    def _by_name(self, inputs: tuple, named: dict) -> tuple:
        """Positional inputs, then the keyword ones by name, in the library's order."""
        names = self.input_names
        unknown = [n for n in named if n not in names]
        if unknown:
            raise InputMismatch(f"{self.path.name} has no input named {', '.join(map(repr, unknown))}; its inputs "
                                f"are {', '.join(names)}")
        twice = [n for n in names[:len(inputs)] if n in named]
        if twice:
            raise InputMismatch(f"input {twice[0]!r} given twice: by position and by keyword")
        missing = [n for n in names[len(inputs):] if n not in named]
        if missing:
            raise InputMismatch(f"{self.path.name}: missing input(s) {', '.join(map(repr, missing))}; its inputs "
                                f"are {', '.join(names)}")
        return tuple(inputs) + tuple(named[n] for n in names[len(inputs):])

    def __call__(self, *inputs: Any, **named: Any) -> Any:
        expected = self.meta["inputs"]
        if named:
            inputs = self._by_name(inputs, named)
        if len(inputs) != len(expected):
            raise InputMismatch(f"{self.path.name} takes {len(expected)} input(s) ({', '.join(self.input_names)}), "
                                f"got {len(inputs)}")
        arrays = []
        for i, (x, (shape, dtype)) in enumerate(zip(inputs, expected)):
            a = np.ascontiguousarray(np.asarray(x), dtype=dtype)
            if list(a.shape) != shape:
                raise InputMismatch(f"input {i} has shape {list(a.shape)}; {self.path.name} was exported for "
                                 f"{shape} (export again with example inputs of the shape you run)")
            arrays.append(self._tensor(a))
        result = self._main(*arrays)
        outputs = [result.numpy()] if hasattr(result, "numpy") else [r.numpy() for r in result]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load(path: "str | Path") -> TvmModel:
    return TvmModel(path)


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python runner.py MODEL.so", file=sys.stderr)
        return 2
    model = load(argv[0])
    print(json.dumps(model.meta, indent=1))
    rng = np.random.default_rng(0)
    outputs = model(*(rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
                      else np.zeros(shape, dtype) for shape, dtype in model.meta["inputs"]))
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        print("output", out.shape, out.dtype, "finite" if np.isfinite(out).all() else "NOT FINITE")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
