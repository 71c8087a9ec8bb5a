"""A small pass manager: each pass states what it requires and ensures and returns a `PassResult` (the graph,
whether it changed, what it applied); the graph is linted after every pass so a broken graph names the pass
that broke it, and every pass's outcome is kept as data (`PassManager.outcomes`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from sparsecc.core.errors import PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    applied: tuple[str, ...] = ()       # what the pass changed: condensed weights, folded BatchNorms, ...


@dataclass(frozen=True)
class PassOutcome:
    name: str
    modified: bool
    applied: tuple[str, ...]
    rewrites: dict[str, int]            # modules put in place, by op


class Pass(Protocol):
    name: str

    def requires(self, gm: fx.GraphModule) -> None: ...

    def call(self, gm: fx.GraphModule) -> PassResult: ...

    def ensures(self, gm: fx.GraphModule) -> None: ...


@dataclass
class PassManager:
    passes: list[Pass]
    rewrites: Counter = field(default_factory=Counter)
    outcomes: list[PassOutcome] = field(default_factory=list)

    def applied(self) -> set[str]:
        return {a for o in self.outcomes for a in o.applied}

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        for p in self.passes:
            try:
                p.requires(gm)
                result = p.call(gm)
                gm = result.graph_module
                gm.graph.lint()
                if result.modified:
                    gm.recompile()
                p.ensures(gm)
            except PassError:
                raise
            except Exception as exc:
                raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
            counts = dict(getattr(p, "counts", {}))
            self.rewrites.update(counts)
            self.outcomes.append(PassOutcome(p.name, result.modified, tuple(result.applied), counts))
        return gm
