"""Reports: what sparsecc found and did per layer, and how close the result is to the masked reference.

FLOPs follow SWAT appendix A.3: one multiply-accumulate per kept weight per output position, so a layer's
forward cost is ``density * F * (C/groups*R*S) * N*H*W`` MACs (Linear: ``density * out * in * tokens``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional


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


@dataclass(frozen=True)
class LayerReport:
    """One layer's row. Frozen: a stage that learns something about a layer says so in its `StageResult`
    (a `LayerChange`), and the report is rebuilt from the results."""

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

    def kept(self, reason: str) -> "LayerReport":
        """This row for a layer that runs as the original dense op after all, and why."""
        return replace(self, action="kept", runtime="torch", reason=reason, bytes_condensed=self.bytes_dense,
                       macs_sparse=self.macs_dense)

    @property
    def total_macs(self) -> tuple[int, int]:
        scale = self.positions or 1
        return self.macs_dense * scale, self.macs_sparse * scale


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _g(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


@dataclass(frozen=True)
class LayerChange:
    """What a stage learnt about one layer. Each field it sets replaces the row's; None leaves it."""

    runtime: Optional[str] = None
    reason: Optional[str] = None
    kept: Optional[str] = None          # the layer runs as the original op after all: why
    choice: Optional[str] = None        # the runtime's measured sparse-or-dense choices
    runs_dense: Optional[bool] = None   # whether a choice runs the dense op (``+dense`` after the runtime)
    error: Optional[ErrorStat] = None
    positions: Optional[int] = None

    def applied(self, row: LayerReport) -> LayerReport:
        if self.kept is not None:
            row = row.kept(self.kept)
        fields = {name: getattr(self, name) for name in ("runtime", "reason", "choice", "error", "positions")
                  if getattr(self, name) is not None}
        row = replace(row, **fields) if fields else row
        if self.runs_dense is not None:
            row = replace(row, runtime=row.runtime.removesuffix("+dense") + ("+dense" if self.runs_dense else ""))
        return row


@dataclass(frozen=True)
class StageResult:
    """What one stage of `sparsecc.compile` found and did, frozen once it returns. The report is built from
    the results in stage order (`Report.built`), never written by the stages: a result is the one record of
    its stage, and a later stage cannot rewrite an earlier one's. Report-level fields a stage leaves None are
    another stage's; the per-layer ``changes`` apply in order, each on the row as the stages before left it."""

    stage: str
    summary: Optional[str]                          # one line; None: the stage did not apply
    seconds: float = 0.0
    rows: Optional[tuple[LayerReport, ...]] = None  # the layers' rows, as planned (the analysis)
    runtime: Optional[str] = None                   # the op runtime the condensed layers were given
    changes: tuple[tuple[str, LayerChange], ...] = ()
    notes: tuple[str, ...] = ()
    capture: Optional[tuple[str, str]] = None       # how the model was captured, and why not as a graph
    rewrites: Optional[tuple[tuple[str, int], ...]] = None
    narrowed: Optional[tuple[Any, ...]] = None      # `sparsecc.planning.narrow.Removal`s
    folded: Optional[tuple[str, ...]] = None        # BatchNorms folded into condensed convolutions
    engine: Optional[str] = None
    end_to_end: Optional[tuple[ErrorStat, ...]] = None   # set by a validation: the report is then validated

    @property
    def applies(self) -> bool:
        return self.summary is not None

    def outcome(self) -> "StageOutcome":
        return StageOutcome(self.stage, self.applies, self.summary or "skipped", self.seconds)


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

    @classmethod
    def built(cls, results: Iterable[StageResult]) -> "Report":
        """The report of a compilation: its stages' results folded in order (see `StageResult`)."""
        report = cls([])
        rows: dict[str, LayerReport] = {}
        for r in results:
            if r.rows is not None:
                rows = {row.name: row for row in r.rows}
            for name, change in r.changes:
                rows[name] = change.applied(rows[name])
            report.notes += r.notes
            report.stages.append(r.outcome())
            for name in ("runtime", "engine"):
                if getattr(r, name) is not None:
                    setattr(report, name, getattr(r, name))
            if r.capture is not None:
                report.capture, report.capture_reason = r.capture
            if r.rewrites is not None:
                report.rewrites = Counter(dict(r.rewrites))
            if r.narrowed is not None:
                report.narrowed = list(r.narrowed)
            if r.folded is not None:
                report.folded = list(r.folded)
            if r.end_to_end is not None:
                report.end_to_end, report.validated = list(r.end_to_end), True
        report.layers = list(rows.values())
        return report
