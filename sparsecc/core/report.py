"""Reports: what sparsecc found and did per layer, and how close the result is to the masked reference.

FLOPs follow SWAT appendix A.3: one multiply-accumulate per kept weight per output position, so a layer's
forward cost is ``density * F * (C/groups*R*S) * N*H*W`` MACs (Linear: ``density * out * in * tokens``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ErrorStat:
    """Max abs error, and max abs error over max |reference| (the scale the tolerance is relative to)."""

    what: str
    max_abs: float
    max_rel: float
    tolerance: float            # allowed max_abs
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what}: max abs {self.max_abs:.2e} (rel {self.max_rel:.1e}, tol {self.tolerance:.1e})" + \
            ("" if self.ok else f" FAILED {self.detail}")


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    structure: str
    density: float
    ablated: int
    mask_source: str
    action: str                 # the sparsecc op that runs it, or "kept"
    reason: str                 # why it was kept
    runtime: str
    bytes_dense: int
    bytes_condensed: int
    macs_dense: int             # per output position until `positions` is known
    macs_sparse: int
    positions: Optional[int] = None
    error: Optional[ErrorStat] = None
    choice: str = ""            # the runtime's sparse-or-dense choice at the example's token counts, with timings

    def keep(self, reason: str) -> None:
        """Record that the layer runs as the original dense op after all, and why."""
        self.action, self.runtime, self.reason = "kept", "torch", reason
        self.bytes_condensed, self.macs_sparse = self.bytes_dense, self.macs_dense

    @property
    def total_macs(self) -> tuple[int, int]:
        scale = self.positions or 1
        return self.macs_dense * scale, self.macs_sparse * scale


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _g(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


@dataclass(frozen=True)
class StageOutcome:
    """One stage of `sparsecc.compile`'s pipeline: whether it applied, what it did, how long it took."""

    stage: str
    ran: bool
    summary: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.stage}: {self.summary} ({self.seconds:.2f} s)"


@dataclass
class Report:
    """Per-layer table plus what happened to the whole model. ``str(report)`` is the table."""

    layers: list[LayerReport]
    runtime: str = "reference"   # the op runtime the condensed layers were given (before any engine)
    engine: Optional[str] = None  # the engine running the whole exported graph, if any
    capture: str = "torch.fx"
    capture_reason: str = ""
    rewrites: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    stages: list[StageOutcome] = field(default_factory=list)     # the compile pipeline, stage by stage
    narrowed: list[Any] = field(default_factory=list)            # `sparsecc.planning.narrow.Removal`s
    folded: list[str] = field(default_factory=list)              # BatchNorms folded into condensed convolutions
    end_to_end: list[ErrorStat] = field(default_factory=list)
    validated: bool = False
    compiled: bool = True        # False for `sparsecc.inspect`: a plan, nothing was rewritten or run

    @property
    def condensed(self) -> list[LayerReport]:
        return [lay for lay in self.layers if lay.action != "kept"]

    def table(self) -> str:
        per_position = any(lay.positions is None for lay in self.layers)
        head = ("layer", "shape", "structure", "density", "op", "runtime", "MiB dense->cond",
                "MACs dense->sparse" + (" /position" if per_position else ""), "max rel err", "note")
        tuned = any(lay.choice for lay in self.layers)
        if tuned:
            head += ("measured choice",)
        rows = []
        for lay in self.layers:
            dense_macs, sparse_macs = (lay.macs_dense, lay.macs_sparse) if per_position else lay.total_macs
            rows.append((lay.name, "x".join(map(str, lay.shape)), lay.structure, f"{lay.density:.1%}", lay.action,
                         lay.runtime, f"{_mib(lay.bytes_dense)}->{_mib(lay.bytes_condensed)}",
                         f"{_g(dense_macs)}->{_g(sparse_macs)}", f"{lay.error.max_rel:.1e}" if lay.error else "-",
                         lay.reason, *((lay.choice,) if tuned else ())))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])

    def summary(self) -> str:
        dense = sum(lay.bytes_dense for lay in self.layers)
        cond = sum(lay.bytes_condensed for lay in self.layers)
        if not self.compiled:
            return (f"{len(self.condensed)}/{len(self.layers)} layers condensable; weights {_mib(dense)} MiB "
                    f"dense -> {_mib(cond)} MiB condensed")
        lines = [f"{len(self.condensed)}/{len(self.layers)} layers condensed "
                 f"({', '.join(f'{n} {op}' for op, n in sorted(self.rewrites.items())) or 'no rewrites'}); "
                 f"runtime {self.runtime}" + (f"; engine {self.engine}" if self.engine else "")
                 + f"; capture {self.capture}"
                 + (f" ({self.capture_reason})" if self.capture_reason else ""),
                 f"weights {_mib(dense)} MiB dense -> {_mib(cond)} MiB condensed"]
        if self.end_to_end:
            lines.append("end to end vs your model: " + "; ".join(map(str, self.end_to_end)))
        elif not self.validated:
            lines.append("not validated yet (validation runs on the first call)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"
